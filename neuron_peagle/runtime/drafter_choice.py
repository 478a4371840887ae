"""Which drafter an engine uses: one the user names, the project's own for the default model, or,
where no trained drafter exists yet, a random-init one (every draft then is nearly always rejected:
correct output, no speedup; the engine says so)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_peagle.config import BuildConfig, DrafterConfig, ModelConfig
from neuron_peagle.datastore import DATASTORE_FILE, load_datastore
from neuron_peagle.errors import ConfigError
from neuron_peagle.graphs.datastore_lookup import NgramDatastore
from neuron_peagle.models.drafter import Drafter
from neuron_peagle.models.drafter_io import load_drafter, read_drafter_config
from neuron_peagle.models.target import TargetModel, default_feature_layers

# The project's trained drafter for the embedded default model ships inside the package.
DEFAULT_DRAFTER_DIR = Path(__file__).resolve().parent.parent / "drafters" / "smollm2-135m-instruct-peagle"


@dataclass
class DrafterChoice:
    config: DrafterConfig
    path: Path | None  # None: random init
    seed: int = 0

    def describe(self) -> str:
        if self.path is None:
            return "random-init drafter (untrained: drafts are almost never accepted)"
        return f"drafter {self.path}"

    @property
    def has_datastore(self) -> bool:
        return self.path is not None and (self.path / DATASTORE_FILE).is_file()

    def load_datastore(self, target: TargetModel) -> NgramDatastore:
        """The drafter directory's n-gram datastore (neuron_peagle.datastore), checked against the target."""
        if self.path is None:
            raise ConfigError("a datastore was asked for, but the drafter is random-init: no drafter directory "
                              f"holds a {DATASTORE_FILE}")
        return load_datastore(self.path / DATASTORE_FILE, target.config.vocab_size)

    def load(self, target: TargetModel, build: BuildConfig) -> Drafter:
        check_servable(self.config)
        if self.path is not None:
            return load_drafter(self.path, target.config, build.max_length, build.torch_dtype)
        return random_drafter(self.config, build.max_length, self.seed).to(build.torch_dtype)


def check_servable(config: DrafterConfig) -> None:
    """Refuse, naming the drafter config field, a drafter the step graphs (graphs/proposers.py) would
    draft from wrong hidden states: an EAGLE-3 drafter trained to be fed its normed output back
    (sequential drafting feeds the last layer's output). Such drafters still load for training and
    evaluation."""
    if config.norm_output and config.trained_with == "eagle3":
        raise ConfigError("drafter config norm_output is true: sequential drafting feeds the last layer's output "
                          "back, not the final norm's this EAGLE-3 drafter was trained on, so it cannot be "
                          "served yet")


def random_drafter(config: DrafterConfig, max_length: int, seed: int = 0) -> Drafter:
    """A drafter with small random weights (norms at one), as training starts from."""
    drafter = Drafter(config, max_length)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in drafter.named_parameters():
            if any("norm" in part for part in name.split(".")[:-1]):  # every norm, fc_norm.N included
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    drafter.rotary.float()
    return drafter


def choose_drafter(target_dir: Path, drafter_dir: str | Path | None, is_default_target: bool,
                   target_config: ModelConfig | None = None) -> DrafterChoice:
    """`target_config`: the target directory's ModelConfig, when the caller has read it already."""
    if drafter_dir is not None:
        return DrafterChoice(read_drafter_config(drafter_dir), Path(drafter_dir))
    if is_default_target and (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        return choose_drafter(target_dir, DEFAULT_DRAFTER_DIR, False)
    target_config = target_config if target_config is not None else ModelConfig.from_dir(target_dir)
    config = DrafterConfig.for_target(target_config, default_feature_layers(target_config.num_hidden_layers))
    return DrafterChoice(config, None)
