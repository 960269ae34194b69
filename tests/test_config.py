import pytest
import yaml

from kidney_seg.config import deep_merge, load_config, load_schema, validate_config
from tests.conftest import REPO


def test_schema_is_2020_12_and_documents_every_key():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def walk(node, path):
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}{name} has no description"
            walk(sub, f"{path}{name}.")

    walk(schema, "")


def test_default_and_demo_configs_validate():
    paper = load_config(REPO / "config.yaml")
    assert paper["dataset"]["source"] == "kits19"
    assert paper["preprocessing"]["target_spacing"] == [3.0, 0.7816, 0.7816]
    assert paper["model"]["base_filters"] == 20 and paper["training"]["batch_size"] == 7
    assert paper["training"]["epochs"] * paper["training"]["steps_per_epoch"] == 1920
    demo = load_config(REPO / "config.yaml", REPO / "presets" / "demo.yaml")
    assert demo["dataset"]["source"] == "phantom" and demo["results_dir"] == "results/demo"


def base():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_unknown_keys_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="dataset.source"):
        validate_config(deep_merge(base(), {"dataset": {"source": "kits99"}}))
    with pytest.raises(ValueError, match="Additional properties"):
        validate_config(deep_merge(base(), {"training": {"epoch": 3}}))
    with pytest.raises(ValueError, match="divisible"):
        validate_config(deep_merge(base(), {"training": {"patch_size": [100, 100]}}))
    with pytest.raises(ValueError, match="sum to 1"):
        validate_config(deep_merge(base(), {"split": {"fractions": [0.5, 0.1, 0.1]}}))
    with pytest.raises(ValueError, match="root or dataset.manifest"):
        validate_config(deep_merge(base(), {"dataset": {"source": "local"}}))
    with pytest.raises(ValueError, match="levels >= 4"):
        validate_config(deep_merge(base(), {"model": {"levels": 3, "deep_supervision": True}}))


def test_defaults_are_filled():
    cfg = base()
    del cfg["inference"]["step"]
    assert validate_config(cfg)["inference"]["step"] == 0.5


def schema_defaults(properties: dict) -> dict:
    """The defaults of a schema's properties, an object's default filled with its own properties' defaults."""
    out = {}
    for name, sub in properties.items():
        if "default" in sub:
            nested = (
                schema_defaults(sub["properties"]) if isinstance(sub["default"], dict) and "properties" in sub else {}
            )
            out[name] = {**nested, **sub["default"]} if nested else sub["default"]
    return out


def test_a_section_is_filled_from_the_schema_alone():
    from kidney_seg.config import with_defaults

    schema = load_schema()["properties"]["training"]["properties"]
    filled = with_defaults("training", {"epochs": 3})
    assert filled["epochs"] == 3
    assert {k: v for k, v in filled.items() if k != "epochs"} == {
        k: v for k, v in schema_defaults(schema).items() if k != "epochs"
    }
    assert (
        with_defaults("postprocessing", {}) == validate_config(base())["postprocessing"]
    )  # config.yaml spells the defaults out
    with pytest.raises(ValueError, match=r"training\.patch_size"):
        with_defaults("training", {"patch_size": [64]})
    with pytest.raises(ValueError, match="preprocessing: 'clip' is a required property"):
        with_defaults("preprocessing", {"target_spacing": None})
    with pytest.raises(ValueError, match="unknown config section"):
        with_defaults("trainig", {})


def test_the_vocabulary_is_not_repeated_in_the_config_module():
    import kidney_seg.config as config

    assert not {"LABELS", "CLASS_NAMES", "labels_for", "class_names"} & set(vars(config))


def test_the_beyond_paper_preset_validates_and_keeps_nnunets_augmentation():
    beyond = load_config(REPO / "config.yaml", REPO / "presets" / "beyond-paper.yaml")
    training = beyond["training"]
    assert (training["optimizer"], training["lr_schedule"], training["learning_rate"]) == ("sgd", "poly", 0.01)
    assert training["gradient_clip_norm"] == 12.0 and training["dice_include_background"] is False
    assert training["epochs"] * training["steps_per_epoch"] == 250_000  # nnU-Net v2's 1000 x 250
    assert training["crop"] == "foreground" and 0 < training["tumor_per_batch"] <= training["foreground_per_batch"]
    assert training["output_activation"] == "softmax"
    assert training["publish"] == "final"  # nnU-Net predicts with checkpoint_final; the paper's setup keeps "best"
    paper = load_config(REPO / "config.yaml")
    assert paper["training"]["publish"] == "best"
    for section in ("dataset", "preprocessing", "split", "model", "inference", "postprocessing"):
        assert beyond[section] == paper[section], f"the preset changes only training, not {section}"
    nnunet = load_config(REPO / "config.yaml", REPO / "presets" / "nnunet-augmentation.yaml")["training"]
    for key in ("augmentation", "p_scale", "scale_range", "p_mirror"):
        assert training[key] == nnunet[key], key


def test_the_cpu_beyond_preset_changes_only_the_recipe_of_the_demo():
    """presets/beyond-paper-cpu.yaml over the demo: the GPU recipe's sampling and augmentation at the demo's size."""
    demo = load_config(REPO / "config.yaml", REPO / "presets" / "demo.yaml")
    cpu = load_config(REPO / "config.yaml", REPO / "presets" / "demo.yaml", REPO / "presets" / "beyond-paper-cpu.yaml")
    gpu = load_config(REPO / "config.yaml", REPO / "presets" / "beyond-paper.yaml")["training"]
    for section in ("dataset", "preprocessing", "split", "model", "inference", "postprocessing"):
        assert cpu[section] == demo[section], f"the CPU recipe changes only training, not {section}"
    training = cpu["training"]
    for key in ("epochs", "steps_per_epoch", "batch_size", "patch_size", "val_slices"):
        assert training[key] == demo["training"][key], f"equal steps and batches: {key}"
    for key in ("lr_schedule", "gradient_clip_norm", "dice_include_background", "foreground_per_batch", "publish"):
        assert training[key] == gpu[key], key
    for key in ("tumor_per_batch", "crop", "augmentation", "p_scale", "scale_range", "p_mirror"):
        assert training[key] == gpu[key], key
    assert (training["optimizer"], training["learning_rate"]) == ("adam", 0.001)
