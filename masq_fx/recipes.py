"""Methods as recipes: RTN, SmoothQuant, MAS-init, MAS and MAS+CMC are step lists over the same transforms.

A :class:`Recipe` is one typed config; :func:`recipe_steps` turns it into pipeline steps that
run after calibration statistics exist (``context.stats``), so several methods can be ablated
on one calibrated capture. :data:`PRESETS` are the named recipes; :func:`resolve_recipe` reads a
name or a JSON/YAML file. A serialised recipe carries ``version`` (:data:`RECIPE_VERSION`): a file
without one is read as the current version, a newer one is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from masq_fx.capture.dataflow import SmoothingGroup
from masq_fx.errors import InputError, MissingFileError
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
from masq_fx.transforms.rotation import RotationConfig
from masq_fx.transforms.sparsity import SparsityConfig

Method = Literal["fp", "rtn", "smoothquant", "mas-init", "mas"]
#: version of :meth:`Recipe.to_dict`'s layout; bumped whenever a field is renamed, removed or changes meaning
RECIPE_VERSION = 1


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
    #: rotations of the float graph before calibration (None: none); the other steps run on the rotated graph
    rotation: RotationConfig | None = None
    #: activation sparsity of the float graph before calibration (LaRoSA, TEAL; None: dense); with method
    #: ``"fp"`` the sparsified float model is the result
    sparsity: SparsityConfig | None = None

    @property
    def moment_modalities(self) -> tuple[Modality, ...]:
        """Modalities whose second moment calibration must collect for this recipe (at some site)."""
        if self.gptq is not None:
            return tuple(Modality)
        return (Modality.VISION, Modality.AUDIO) if self.cmc is not None else ()

    def site_moments(self, site: SmoothingGroup) -> tuple[Modality, ...]:
        """The second moments this recipe reads at one linear site: every modality's where GPTQ solves its
        weights; vision's and audio's where CMC compensates (per-modality smoothing rows: a smoothed kind);
        none elsewhere (e.g. down_proj under MAS + CMC, which is not smoothed by default)."""
        if self.method == "fp" or not any(self.modules(name) for name in site.linears):
            return ()
        if self.gptq is not None:
            return tuple(Modality)
        compensated = self.cmc is not None and self.smoothing.per_modality and site.kind in self.smoothing.kinds
        return (Modality.VISION, Modality.AUDIO) if compensated else ()

    @property
    def modality_aware(self) -> bool:
        """Whether the recipe treats modalities differently (per-modality scales or CMC branches)."""
        per_modality = self.method in ("smoothquant", "mas-init", "mas") and self.smoothing.per_modality
        return per_modality or self.cmc is not None

    @property
    def label(self) -> str:
        """Short name, e.g. ``mas W4A8 +clip +GPTQ +CMC`` or ``smoothquant W4A16 g64 +GPTQ``."""
        sparse = "" if self.sparsity is None else f" +{self.sparsity.method} {self.sparsity.target:.0%}"
        if self.sparsity is not None and self.sparsity.levels is not None:
            sparse = f" +{self.sparsity.method} {self.sparsity.levels[0]:.0%}/{self.sparsity.levels[1]:.0%}"
        if self.method == "fp":
            return "fp (not quantized)" if not sparse else f"fp{sparse}"
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
        if self.rotation is not None:
            label += " +rot"
        return label + sparse

    def __post_init__(self) -> None:
        if self.method not in ("fp", "rtn", "smoothquant", "mas-init", "mas"):
            raise InputError(f"unknown method {self.method!r}; expected fp, rtn, smoothquant, mas-init or mas")
        if self.gptq is not None and self.method == "fp":
            raise InputError("GPTQ needs quantized weights: pick a method other than 'fp'")
        if self.rotation is not None and self.method == "fp":
            raise InputError("a rotation alone changes no numbers: pick a quantization method, or drop the rotation")
        if self.rotation is not None and self.sparsity is not None:
            raise InputError("rotation and sparsity both rotate the residual stream: drop one (LaRoSA brings its own rotations)")
        if self.cmc is not None and self.method not in ("mas-init", "mas"):
            raise InputError("cross-modal compensation applies to MAS scales: use method 'mas' or 'mas-init'")
        if self.method == "mas" and self.learning.own_channels_in_loop and (self.cmc is None or self.cmc.own_channels is None):
            raise InputError(
                "learning.own_channels_in_loop learns under the CMC's own_channels constraint: set cmc.own_channels "
                "(e.g. 'rank'), or turn own_channels_in_loop off"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``version``, then nested configs as dicts, tuples as lists, paths as strings."""
        return {"version": RECIPE_VERSION} | _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; missing sections and fields take their defaults, a missing ``version`` is the current one."""
        if isinstance(data, dict) and "version" in data:
            data = dict(data)
            version = data.pop("version")
            if not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
                raise InputError(
                    f"recipe version {version!r} is not one this masq_fx reads (1..{RECIPE_VERSION}): "
                    "upgrade masq_fx, or drop 'version' to read the fields as the current version"
                )
        _check_keys(cls, data, "recipe")
        learning = _config(MASLearningConfig, data.get("learning", {}), "recipe learning")
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
            rotation=section("rotation", RotationConfig),
            sparsity=section("sparsity", SparsityConfig),
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of field names to values, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        known = ", ".join(f.name for f in fields(cls))
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {known}")


def _config(cls: type, data: dict[str, Any], where: str) -> Any:
    """A frozen config dataclass from its dict (lists back to tuples)."""
    _check_keys(cls, data, where)
    return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})


def preset(method: Method, wbits: int, abits: int, variant: Literal["per_linear", "tied"] | None = None) -> Recipe:
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


#: W4 compensation measured on the built-in tri-modal model: a modality's own scale kept on the rank's
#: channels only (``own_channels="rank"``), since full-channel scale mismatches are out of a low-rank
#: branch's reach (the spec's CMC there: vision and audio exact match 0%)
_W4_CMC = CMCConfig(rank_ratio=0.05, own_channels="rank")


def _paper_w4a8() -> Recipe:
    """MAS + CMC (ρ = 0.2, every channel's own scale) with the official code's numerics: symmetric grids that
    stop at ±(2^(b−1)−1) (weights −7…7, activations −127…127) and a rank floor of 32.

    One difference is kept: the whitening covariance is damped by 0.01·mean(diag C). The official code
    adds none and clamps the factors to ±65500 instead; without damping a covariance of fewer tokens
    than channels is singular, its inverse square root overflows, and the clamp hides the damage.
    """
    recipe = preset("mas", 4, 8)
    weight = replace(recipe.weight, grid="restricted")
    activation = ActQuantConfig(bits=8, grid="restricted")
    return replace(recipe, weight=weight, activation=activation, cmc=CMCConfig(rank_floor=32))


def _masquant_w4(abits: int) -> Recipe:
    """MAS with learned weight clipping, learned under CMC's constraint (each modality's own scale on the
    rank's channels only), GPTQ, and that CMC."""
    recipe = preset("mas", 4, abits)
    learning = replace(recipe.learning, learn_clipping=True, own_channels_in_loop=True)
    return replace(recipe, learning=learning, gptq=GPTQConfig(), cmc=_W4_CMC)


#: named recipes. ``masquant-*`` learn per-modality scales; at 4 bits they also learn weight clipping,
#: solve the weights with GPTQ and keep one stored weight plus CMC branches (each measured to help on
#: the tri-modal model and SmolLM2; README "Measured"); ``masquant-w4a8`` runs on the Hadamard-rotated
#: float graph (``benchmarks/rotation.py``: rotation lifts every W4A8 method there). ``quarot-w4a8`` is the
#: modality-blind rotation baseline (RTN + GPTQ on the rotated graph). ``masquant-w4a8-paper`` is the
#: paper's method as the official code runs it (:func:`_paper_w4a8`), for reproduction. ``larosa-*`` and ``teal-*``
#: sparsify the float model's activations (the number: the model-level sparsity in percent), quantizing nothing.
#: After ``lower()`` W8A8 and W4A8 run on torchao int8 kernels, W4A16 on the int4 CPU kernel; W4A6 stays reference numerics.
PRESETS: dict[str, Recipe] = {
    "rtn-w8a8": preset("rtn", 8, 8),
    "smoothquant-w8a8": preset("smoothquant", 8, 8),
    "smoothquant-w4a8": preset("smoothquant", 4, 8),
    "smoothquant-w4a8-gptq": replace(preset("smoothquant", 4, 8), gptq=GPTQConfig()),
    "quarot-w4a8": replace(preset("rtn", 4, 8), gptq=GPTQConfig(), rotation=RotationConfig()),
    "masquant-w8a8": preset("mas", 8, 8),
    "masquant-w4a8": replace(_masquant_w4(8), rotation=RotationConfig()),
    "masquant-w4a6": _masquant_w4(6),
    "masquant-w4a16": _masquant_w4(16),
    "masquant-w4a8-paper": _paper_w4a8(),
    **{f"{method}-{level}": Recipe("fp", sparsity=SparsityConfig(method, level / 100)) for method in ("larosa", "teal") for level in (25, 40, 50)},
}
RECIPE_SUFFIXES = (".json", ".yaml", ".yml")


def resolve_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A :class:`Recipe`, a preset name, or a JSON/YAML file of :meth:`Recipe.to_dict` fields (missing ones default)."""
    if isinstance(recipe, Recipe):
        return recipe
    if str(recipe) in PRESETS:
        return PRESETS[str(recipe)]
    path = Path(recipe)
    if path.suffix.lower() not in RECIPE_SUFFIXES:
        raise InputError(
            f"unknown recipe {str(recipe)!r}: use one of {', '.join(PRESETS)} or a .json/.yaml file of Recipe fields "
            "(Recipe.to_dict(); missing fields take their defaults)"
        )
    if not path.is_file():
        raise MissingFileError(f"recipe file {path} does not exist: check the path, or use a preset ({', '.join(PRESETS)})")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{path}: invalid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    return Recipe.from_dict(data)
