"""Methods as recipes: RTN, SmoothQuant, MAS-init, MAS and MAS+CMC are step lists over the same transforms.

A :class:`Recipe` is one typed config; :func:`recipe_steps` turns it into pipeline steps that
run after calibration statistics exist (``context.stats``), so several methods can be ablated
on one calibrated capture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from masq_fx.modality import Modality
from masq_fx.pipeline import Transform
from masq_fx.quantizers import ActQuantConfig, WeightQuantConfig
from masq_fx.transforms import (
    PrepareQuantLinears,
    QuantizeActivations,
    QuantizeWeights,
    SmoothingConfig,
    SmoothScales,
)
from masq_fx.transforms.cmc import CMCConfig, CrossModalCompensation, ProjectScales
from masq_fx.transforms.gptq import GPTQConfig, GPTQWeights
from masq_fx.transforms.mas import LearnMAS, MASLearningConfig
from masq_fx.transforms.quantize import ModuleFilter

Method = Literal["fp", "rtn", "smoothquant", "mas-init", "mas"]


@dataclass(frozen=True)
class Recipe:
    method: Method = "mas"
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    #: None: weight-only (W4A16 and the like)
    activation: ActQuantConfig | None = field(default_factory=ActQuantConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    learning: MASLearningConfig = field(default_factory=MASLearningConfig)
    #: cross-modal compensation after MAS: one stored weight plus low-rank branches (None: per-row weights)
    cmc: CMCConfig | None = None
    #: GPTQ error feedback on the final smoothed weights (None: round to nearest)
    gptq: GPTQConfig | None = None
    #: which decoder linears are quantized, by module-name regex (``layers.3.mlp.up_proj``); the LM head never is
    modules: ModuleFilter = field(default_factory=ModuleFilter)

    @property
    def moment_modalities(self) -> tuple[Modality, ...]:
        """Modalities whose second moment calibration must collect for this recipe."""
        if self.gptq is not None:
            return tuple(Modality)
        return (Modality.VISION, Modality.AUDIO) if self.cmc is not None else ()

    @property
    def label(self) -> str:
        """Short name, e.g. ``mas W4A8 +clip +GPTQ +CMC`` or ``smoothquant W4A16 g64 +GPTQ``."""
        if self.method == "fp":
            return "fp (not quantized)"
        label = f"{self.method} W{self.weight.bits}A{16 if self.activation is None else self.activation.bits}"
        if self.weight.group_size is not None:
            label += f" g{self.weight.group_size}"
        if self.method == "mas" and self.learning.learn_clipping:
            label += " +clip"
        if self.method == "mas" and self.learning.own_channels_in_loop:
            label += " +tied"
        if self.gptq is not None:
            label += " +GPTQ"
        if self.cmc is not None:
            label += " +CMC"
        return label

    def __post_init__(self) -> None:
        if self.method not in ("fp", "rtn", "smoothquant", "mas-init", "mas"):
            raise ValueError(f"unknown method {self.method!r}; expected fp, rtn, smoothquant, mas-init or mas")
        if self.gptq is not None and self.method == "fp":
            raise ValueError("GPTQ needs quantized weights: pick a method other than 'fp'")
        if self.cmc is not None and self.method not in ("mas-init", "mas"):
            raise ValueError("cross-modal compensation applies to MAS scales: use method 'mas' or 'mas-init'")
        if self.method == "mas" and self.learning.own_channels_in_loop and (self.cmc is None or self.cmc.own_channels is None):
            raise ValueError(
                "learning.own_channels_in_loop learns under the CMC's own_channels constraint: set cmc.own_channels "
                "(e.g. 'rank'), or turn own_channels_in_loop off"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: nested configs as dicts, tuples as lists, paths as strings."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; missing sections and fields take their defaults."""
        _check_keys(cls, data, "recipe")
        learning = _config(MASLearningConfig, data.get("learning", {}), "recipe learning")
        if learning.checkpoint is not None:
            learning = replace(learning, checkpoint=Path(learning.checkpoint))
        default = cls()

        def section(name: str, config: type) -> Any:
            if name not in data:
                return getattr(default, name)
            return None if data[name] is None else _config(config, data[name], f"recipe {name}")

        return cls(
            method=data.get("method", default.method),
            weight=section("weight", WeightQuantConfig),
            activation=section("activation", ActQuantConfig),
            smoothing=section("smoothing", SmoothingConfig),
            learning=learning,
            cmc=section("cmc", CMCConfig),
            gptq=section("gptq", GPTQConfig),
            modules=section("modules", ModuleFilter),
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of field names to values, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        known = ", ".join(f.name for f in fields(cls))
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {known}")


def _config(cls: type, data: dict[str, Any], where: str) -> Any:
    """A frozen config dataclass from its dict (lists back to tuples)."""
    _check_keys(cls, data, where)
    return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})


def preset(method: Method, wbits: int, abits: int, variant: str | None = None) -> Recipe:
    """The paper's settings: symmetric per-channel weights, dynamic per-token activations.

    ``abits >= 16`` means weight-only, with weights in groups of 64 input channels instead.
    SmoothQuant defaults to the tied variant (one scale per input, folded into the norm, all
    tokens); MAS to per-linear, per-modality scales (the official code).
    """
    smoothing = SmoothingConfig(variant="tied", per_modality=False) if method == "smoothquant" else SmoothingConfig()
    if variant is not None:
        smoothing = replace(smoothing, variant=variant)
    if abits >= 16:
        return Recipe(method, WeightQuantConfig(bits=wbits, group_size=64), None, smoothing)
    return Recipe(method, WeightQuantConfig(bits=wbits), ActQuantConfig(bits=abits), smoothing)


def recipe_steps(recipe: Recipe, progress: bool = True) -> list[Transform]:
    """Pipeline steps of ``recipe`` (they require calibration statistics)."""
    if recipe.method == "fp":
        return []
    steps: list[Transform] = [PrepareQuantLinears()]
    if recipe.method != "rtn":
        steps.append(SmoothScales(recipe.smoothing))
    steps.append(QuantizeWeights(recipe.weight, recipe.modules))
    if recipe.activation is not None:
        steps.append(QuantizeActivations(recipe.activation, recipe.modules))
    if recipe.method == "mas":
        steps.append(LearnMAS(recipe.learning, progress=progress, cmc=recipe.cmc))
    if recipe.cmc is not None and recipe.cmc.own_channels is not None:
        steps.append(ProjectScales(recipe.cmc))  # before GPTQ solves weights for the final scales
    if recipe.gptq is not None:
        steps.append(GPTQWeights(recipe.gptq, progress=progress))
    if recipe.cmc is not None:
        steps.append(CrossModalCompensation(recipe.cmc))
    return steps
