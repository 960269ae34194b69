import numpy as np
import pytest

from kidney_seg.config import load_config, with_defaults
from kidney_seg.model import build_from_config, build_unet, load_model
from kidney_seg.vocabulary import labels_of
from tests.conftest import REPO


def test_the_repos_config_builds_the_papers_12_3m_parameter_model():
    cfg = load_config(REPO / "config.yaml")  # the paper's setup, as the workflow reads it
    model = build_from_config(
        cfg["model"], len(labels_of(cfg["dataset"]["source"])), cfg["training"]["output_activation"]
    )
    assert 12.2e6 < model.count_params() < 12.4e6


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest"])
@pytest.mark.parametrize("order", ["conv_act_norm", "conv_norm_act"])
def test_small_unet_shapes(upsampling, order):
    model = build_unet(num_classes=3, base_filters=4, levels=3, upsampling=upsampling, block_order=order)
    for shape in [(2, 16, 16, 1), (1, 24, 40, 1)]:
        out = model(np.zeros(shape, np.float32), training=False)  # eager: no predict function traced per shape
        assert out.shape == shape[:3] + (3,)
    names = [layer.name for layer in model.layers]
    first = [n for n in names if n.startswith("enc0_0")]
    expected = (
        ["enc0_0_conv", "enc0_0_act", "enc0_0_bn"]
        if order == "conv_act_norm"
        else ["enc0_0_conv", "enc0_0_bn", "enc0_0_act"]
    )
    assert first == expected


def test_bad_options():
    with pytest.raises(ValueError):
        build_unet(upsampling="cubic", levels=2, base_filters=2)
    with pytest.raises(ValueError):
        build_unet(block_order="norm_first", levels=2, base_filters=2)


def test_bilinear_upsampling_matches_resize():
    import keras

    from kidney_seg.model import BilinearUpsample2x

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ours = keras.ops.convert_to_numpy(BilinearUpsample2x()(x))
    ref = keras.ops.convert_to_numpy(keras.layers.UpSampling2D(2, interpolation="bilinear")(x))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_saved_model_round_trip(tmp_path):

    model = build_unet(num_classes=3, base_filters=4, levels=3)
    x = np.random.default_rng(1).normal(size=(1, 16, 24, 1)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    again = load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(again(x, training=False)), np.asarray(model(x, training=False)), atol=1e-5)


@pytest.mark.parametrize("activation,channels", [("softmax", 3), ("sigmoid", 2), ("regions", 2)])
def test_build_from_config_output_channels(activation, channels):
    from kidney_seg.model import build_from_config

    cfg = with_defaults("model", {"base_filters": 2, "levels": 2, "blocks_per_level": 1, "bn_momentum": 0.9})
    model = build_from_config(cfg, 3, output_activation=activation)
    assert model(np.zeros((1, 8, 8, 1), np.float32), training=False).shape == (1, 8, 8, channels)
    assert build_unet(num_classes=3, num_outputs=2, base_filters=2, levels=2).output_shape[-1] == 2
    with pytest.raises(ValueError):
        build_from_config(cfg, 3, output_activation="tanh")


@pytest.mark.parametrize("levels, scales", [(4, (2,)), (5, (2, 4)), (6, (2, 4, 8))])
def test_deep_supervision_heads_and_weights_follow_nnunet(levels, scales):
    from kidney_seg.model import deep_supervision_scales, deep_supervision_weights

    assert deep_supervision_scales(levels) == scales
    # nnU-Net v2 (nnUNetTrainer._build_loss): 1/2^i over the levels-1 decoder stages, the coarsest set to 0, normalised
    nnunet = np.array([1 / 2**i for i in range(levels - 1)])
    nnunet[-1] = 0
    assert deep_supervision_weights(len(scales)) == pytest.approx(list(nnunet[:-1] / nnunet.sum()))


def test_deep_supervised_model_packs_the_heads_and_gives_back_the_plain_unet():
    from kidney_seg.model import inference_model, supervision_scales

    cfg = with_defaults("model", {"base_filters": 2, "levels": 4, "blocks_per_level": 1, "deep_supervision": True})
    model = build_from_config(cfg, 3, "softmax", training=True)
    assert supervision_scales(model) == (2,) and model.output_shape[-1] == 6
    x = np.random.default_rng(2).normal(size=(1, 16, 24, 1)).astype(np.float32)
    packed = np.asarray(model(x, training=False))
    head = packed[..., 3:]  # the 1/2 grid's logits, each repeated over a 2 x 2 block
    assert np.array_equal(head, np.repeat(np.repeat(head[:, ::2, ::2], 2, axis=1), 2, axis=2))
    plain = inference_model(model)
    assert plain.output_shape[-1] == 3 and not supervision_scales(plain)
    assert np.array_equal(np.asarray(plain(x, training=False)), packed[..., :3])  # the same weights
    assert build_from_config(cfg, 3, "softmax").output_shape[-1] == 3  # prediction builds the plain U-Net
    with pytest.raises(ValueError, match="at least 4 levels"):
        build_unet(num_classes=3, base_filters=2, levels=3, deep_supervision=True)
