"""The model families and their parts. Importing any of it registers the config resolvers (models/configs.py)."""
from models import configs as _configs  # noqa: F401
