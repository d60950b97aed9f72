"""The Markdown of a benchmark result (scripts/benchmark.py writes it beside the JSON)."""
from __future__ import annotations

import platform

from benchmarks.fast_paths import FRESH_PROCESS


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['device']} ({m['gpu'] or platform.processor() or 'cpu'}), {m['cpu_threads']} threads "
             f"({m.get('train_threads', m['cpu_threads'])} for the training rows), torch {m['torch']}"
             + ("; both loops with glibc malloc keeping freed memory (cpu_malloc_cache)" if m.get("cpu_malloc_cache") else ""),
             f"Training rows: digits at {r['settings'].get('image_size', 8)}x{r['settings'].get('image_size', 8)}, "
             f"batch {r['settings']['batch_size']}, median step of {r['settings']['batches']} batches, "
             f"{r['settings']['repeats']} repeats ("
             + ("genbench and bare interleaved step by step; ratio: median over runs of the median per-step ratio"
                if r["settings"].get("method") == "interleaved" else "genbench and bare back to back") + ")",
             "", "| family | genbench img/s | bare img/s | ratio | peak MB (genbench / bare) |",
             "|---|---|---|---|---|"]
    for t in r["training"]:
        lines.append(f"| {t['family']} | {t['genbench_img_s']:.0f} | {t['bare_img_s']:.0f} | {t['ratio']:.3f} | "
                     f"{t['genbench_peak_mb']:.0f} / {t['bare_peak_mb']:.0f} |")
    if r.get("fast_paths"):
        head, *rows = r["fast_paths"]
        peak = f", peak {head['peak_tflops']:.0f} TFLOP/s" if head["peak_tflops"] else ""
        lines += ["", f"Fast paths ({head['family']}, {head['gflop_per_image']:.3f} GFLOP per training image{peak}; "
                  "vs default: median over rounds of speed(switch) / speed(default), each run "
                  + ("interleaved with the default bare loop" if rows[0].get("method") == "interleaved" else "back to back")
                  + "; † back to back in fresh processes):", "",
                  "| switch | img/s | vs default | model TFLOP/s | MFU |", "|---|---|---|---|---|"]
        for row in rows:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            mark = " †" if row["fast_path"] in FRESH_PROCESS and rows[0].get("method") == "interleaved" else ""
            lines.append(f"| {row['fast_path']}{mark} | {row['img_s']:.0f} | {row['vs_default']:.3f} | "
                         f"{row['model_tflop_s']:.4f} | {mfu} |")
    if r.get("inception"):
        lines += ["", "inception_pool extractor (8x8 images resized to 299x299 inside; "
                  f"{m.get('train_threads', m['cpu_threads'])} thread(s)):", "",
                  "| images per forward | s/image | speedup vs first | max feature difference |", "|---|---|---|---|"]
        for row in r["inception"]:
            lines.append(f"| {row['chunk']} | {row['sec_per_image']:.4f} | {row['speedup']:.2f} | {row['max_abs_diff']:.1e} |")
    if "fid_vs_sqrtm" not in r:   # --training-only
        return "\n".join(lines) + "\n"
    f = r["fid_vs_sqrtm"]
    e = r["evaluation"]
    lines += ["", f"FID at {f['dim']} dims: {f['seconds_ours']:.2f} s (eigenvalue form) vs {f['seconds_sqrtm']:.2f} s "
              f"(scipy sqrtm) = {f['speedup']:.1f}x faster, relative difference {f['rel_diff']:.1e}",
              f"Evaluation: {e['extractor_passes_per_image']:.2f} extractor passes per generated image feed "
              f"{', '.join(e['metrics_fed'])}; real-image passes: first evaluation {e['real_image_passes_first']}, "
              f"second (cached) {e['real_image_passes_second']}",
              "", "| DDPM sampler | NFE | s/sample | peak MB |", "|---|---|---|---|"]
    for s in r["sampling"]:
        lines.append(f"| {s['sampler']} | {s['nfe']:.0f} | {s['sec_per_sample']:.4f} | {s['peak_mb']:.0f} |")
    if r.get("sampler_fid"):
        sf = r["sampler_fid"]
        lines += ["", f"Sampler quality ({sf['num_samples']} samples, {sf['run_dir']}):", "",
                  "| sampler | NFE | FID | FID / ancestral-1000 |", "|---|---|---|---|"]
        for p in sf["points"]:
            lines.append(f"| {p['label']} | {p['nfe']:.0f} | {p['fid']:.2f} [{p['extractor']}] | "
                         f"{p['fid_ratio_to_ancestral']:.3f} |")
    return "\n".join(lines) + "\n"
