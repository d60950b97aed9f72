"""The W&B dashboard of a genbench sweep, as code (wandb-workspaces, the library W&B publishes for
saved workspaces): one function builds the workspace spec offline; saving it needs the network.

What the panels read is what every genbench run carries (scripts/loggers.py run_config):
group = the sweep, job_type = the family, tags, and flat config keys (family, dataset,
image_size, num_classes, sampler, guidance_scale, classifier_scale, seed); metrics are logged as
``eval/<metric>`` (primary extractor) and ``eval/<extractor>/<metric>`` (the final evaluation's
extra extractors), the sample grid as ``eval/samples``, the benchmark table (scripts/make_table.py)
as ``benchmark_table``. A panel whose metric no run logged (sFID before the ADM evaluator exists,
a guidance sweep in an unconditional group) is simply empty.
"""
from __future__ import annotations

from dataclasses import dataclass

#: metric curves against the training step, per family (seeds grouped: mean and min-max band)
CURVES = ("fid", "sfid", "precision", "recall", "is", "class_acc")
#: extractors whose figures get panels of their own (figures of different feature spaces never share one)
EXTRACTORS = ("", "inception_pool/", "inception/")
#: the guidance sweep's figures against its scale
SWEEP_METRICS = ("fid", "is", "precision", "recall", "class_acc")
#: bars per family (run summaries)
BARS = ("bpd", "nfe", "sec_per_sample", "train_flops")
FAMILY_KEY = "family"


@dataclass(frozen=True)
class DashboardTarget:
    entity: str
    project: str
    group: str
    name: str | None = None

    @property
    def title(self) -> str:
        return self.name or f"genbench: {self.group}"


def metric_key(extractor: str, metric: str) -> str:
    return f"eval/{extractor}{metric}"


def build_workspace(target: DashboardTarget):
    """The saved-workspace spec of one sweep (group): sections of panels and the run set's filter
    (group == target.group, the make_table runs included) and grouping (one colour per family)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def curves(extractor: str) -> list:
        return [wr.LinePlot(title=f"{metric_key(extractor, m)} vs step", x="Step", y=[metric_key(extractor, m)],
                            groupby=wr.Config(FAMILY_KEY), groupby_aggfunc="mean", groupby_rangefunc="minmax")
                for m in CURVES]

    def scatter(extractor: str):
        return wr.ScatterPlot(title=f"precision vs recall [{extractor.rstrip('/') or 'primary'}]",
                              x=wr.SummaryMetric(metric_key(extractor, "recall")),
                              y=wr.SummaryMetric(metric_key(extractor, "precision")))

    sweep = [wr.ScatterPlot(title=f"{metric_key('', m)} vs {scale}", x=wr.Config(scale),
                            y=wr.SummaryMetric(metric_key("", m)))
             for scale in ("guidance_scale", "classifier_scale") for m in SWEEP_METRICS]
    sweep += [wr.ScatterPlot(title=f"precision vs recall along {scale}", x=wr.SummaryMetric("eval/recall"),
                             y=wr.SummaryMetric("eval/precision"), z=wr.Config(scale))
              for scale in ("guidance_scale", "classifier_scale")]
    bars = [wr.BarPlot(title=f"{metric_key('', m)} per family", metrics=[wr.SummaryMetric(metric_key("", m))],
                       groupby=wr.Config(FAMILY_KEY), groupby_aggfunc="mean", groupby_rangefunc="minmax")
            for m in BARS]
    sections = [
        *[ws.Section(name=f"curves [{e.rstrip('/') or 'primary extractor'}]", panels=curves(e), is_open=not e)
          for e in EXTRACTORS],
        ws.Section(name="precision / recall", panels=[scatter(e) for e in EXTRACTORS], is_open=True),
        ws.Section(name="guidance sweep", panels=sweep, is_open=True),
        ws.Section(name="likelihood and sampling cost", panels=bars, is_open=True),
        ws.Section(name="samples", panels=[wr.MediaBrowser(title="sample grids", media_keys=["eval/samples"],
                                                           num_columns=4)], is_open=True),
        ws.Section(name="benchmark table", panels=[wr.WeavePanelSummaryTable(table_name="benchmark_table")],
                   is_open=True),
    ]
    runset = ws.RunsetSettings(filters=[ws.Metric("Group") == target.group],
                               groupby=[ws.Config(FAMILY_KEY)])
    return ws.Workspace(entity=target.entity, project=target.project, name=target.title, sections=sections,
                        runset_settings=runset)


def describe(workspace) -> list[str]:
    """One line per section and panel (what `scripts/wandb_dashboard.py --dry-run` prints)."""
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}",
             f"  runs: {workspace.runset_settings.filters}, grouped by {workspace.runset_settings.groupby}"]
    for section in workspace.sections:
        lines.append(f"  [{section.name}]")
        lines += [f"    {type(p).__name__}: {getattr(p, 'title', None) or getattr(p, 'table_name', '')}"
                  for p in section.panels]
    return lines
