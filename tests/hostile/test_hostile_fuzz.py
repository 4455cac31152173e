"""Property-based fuzz of the parsers that read files: any JSON-like value either loads into a
valid object or raises vitkit's own error (a `VitkitError`), never another exception.
Derandomized, so CI sees the same 200 examples per parser every run."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitkit import limits
from vitkit.config import ViTConfig
from vitkit.data.processor import ImageProcessor
from vitkit.errors import VitkitError
from vitkit.train.recipe import Recipe

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1e-6, 2.7, 224, 16, 3, 768, 12]),
    st.text(max_size=8),
    st.sampled_from(["token", "avg", "gelu", "learned", "bicubic", "12", "1e-3", "nan"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _documents(keys, base):
    """Dicts of the parser's own keys, and a valid `base` with up to three values replaced
    (to reach the checks behind the first one)."""
    mutated = st.dictionaries(st.sampled_from(keys), json_values, max_size=3).map(
        lambda changes: {**base, **changes}
    )
    return st.one_of(
        mutated,
        st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=8),
    )


TINY = dict(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)


CONFIG_KEYS = [f.name for f in dataclasses.fields(ViTConfig)] + ["model_type"]
HF_PROCESSOR_KEYS = [
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_center_crop", "crop_size", "crop_pct", "vitkit",
    "image_processor_type",
]  # fmt: skip
RECIPE_KEYS = [f.name for f in dataclasses.fields(Recipe)]
TIMM_CFG_KEYS = ["input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"]
TIMM_CFG = {"input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic"}


OUTCOMES: dict[str, int] = {}


def _loads_or_refuses(parse, data):
    name = parse.__qualname__
    try:
        result = parse(data)
    except VitkitError:
        OUTCOMES[name + " refused"] = OUTCOMES.get(name + " refused", 0) + 1
        return None
    OUTCOMES[name + " loaded"] = OUTCOMES.get(name + " loaded", 0) + 1
    return result


@SETTINGS
@given(st.one_of(_documents(CONFIG_KEYS, TINY), json_values))
def test_config_from_any_json(data):
    config = _loads_or_refuses(ViTConfig.from_dict, data)
    if config is not None:
        config.validate()
        assert config.estimated_params() <= limits.limit("PARAMS")
        assert ViTConfig.from_dict(config.to_dict()) == config


@SETTINGS
@given(st.one_of(_documents(HF_PROCESSOR_KEYS, ImageProcessor().to_hf_dict()), json_values))
def test_processor_from_any_json(data):
    processor = _loads_or_refuses(ImageProcessor.from_hf_dict, data)
    if processor is not None:
        hw = processor.output_hw
        assert hw is None or hw[0] * hw[1] <= limits.limit("INPUT_PIXELS")
        assert ImageProcessor.from_hf_dict(processor.to_hf_dict()) == processor


@SETTINGS
@given(st.one_of(_documents(TIMM_CFG_KEYS, TIMM_CFG), json_values))
def test_timm_pretrained_cfg_from_any_json(data):
    """A timm folder's config.json states its preprocessing in `pretrained_cfg`."""
    processor = _loads_or_refuses(ImageProcessor.from_timm_cfg, data)
    if processor is not None:
        assert processor.backend == "pil" and processor.crop_size is not None


@SETTINGS
@given(st.one_of(_documents(RECIPE_KEYS, Recipe().to_dict()), json_values))
def test_recipe_from_any_json(data):
    _loads_or_refuses(Recipe.from_dict, data)
