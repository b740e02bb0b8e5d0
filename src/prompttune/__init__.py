"""prompttune: learn prompts for frozen pretrained models."""

__version__ = "0.1.0"

from .api import PromptTuner  # noqa: E402
from .config import DataConfig, RunConfig, TaskConfig, TrainConfig  # noqa: E402
from .discrete.api import read_search_config, search  # noqa: E402
from .errors import PromptTuneError  # noqa: E402

__all__ = [
    "DataConfig",
    "PromptTuneError",
    "PromptTuner",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "__version__",
    "read_search_config",
    "search",
]
