"""The paper's 2D U-Net, written on Keras 3's backend-neutral API (channels-last).

A block is Conv2D 3x3 'same' -> LeakyReLU(0.3) -> BatchNorm (the authors' code; the
order is configurable). Each level has ``blocks_per_level`` blocks and f0 * 2^level
filters; the encoder max-pools between levels, the decoder upsamples by 2 (bilinear as
the paper says, or nearest as the authors' code did), concatenates the skip and applies
the same blocks. A 1x1 convolution gives one logit per class (softmax output) or one per
foreground class (the sigmoid counterpart); the activation lives in the loss. With f0=20,
6 levels and 2 blocks this has about 12.3M parameters.

With deep supervision (nnU-Net's; training only) the training model also has a 1x1 logit
head on decoder stages below full resolution; see :func:`deep_supervision_scales`.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="kidney_seg")
class BilinearUpsample2x(layers.Layer):
    """Bilinear x2 upsampling (half-pixel centres, edge clamped) for inputs of any size.

    Equal to ``UpSampling2D(2, interpolation="bilinear")``, which in Keras 3 cannot trace
    inputs whose height and width are unknown.
    """

    @staticmethod
    def _along(x, axis: int):
        """Double ``x`` along one spatial axis: 0.75 of each pixel plus 0.25 of a neighbour."""
        n = ops.shape(x)[axis]
        first = ops.take(x, [0], axis=axis)
        last = ops.take(x, ops.expand_dims(n - 1, 0), axis=axis)
        prev = ops.concatenate([first, ops.take(x, ops.arange(0, n - 1), axis=axis)], axis=axis)
        nxt = ops.concatenate([ops.take(x, ops.arange(1, n), axis=axis), last], axis=axis)
        pair = ops.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
        shape = ops.shape(x)
        new = [shape[0], shape[1], shape[2], shape[3]]
        new[axis] = new[axis] * 2
        return ops.reshape(pair, new)

    def call(self, x):
        return self._along(self._along(x, 1), 2)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else 2 * h, None if w is None else 2 * w, c)


def conv_block(x, filters: int, block_order: str, leaky_alpha: float, name: str, bn_momentum: float = 0.99):
    """Conv 3x3 followed by LeakyReLU and BatchNorm in the configured order."""
    x = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv")(x)
    act = layers.LeakyReLU(negative_slope=leaky_alpha, name=f"{name}_act")
    norm = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")
    if block_order == "conv_act_norm":
        return norm(act(x))
    if block_order == "conv_norm_act":
        return act(norm(x))
    raise ValueError(f"unknown block_order {block_order!r}")


def build_unet(
    num_classes: int = 3,
    in_channels: int = 1,
    base_filters: int = 20,
    levels: int = 6,
    blocks_per_level: int = 2,
    block_order: str = "conv_act_norm",
    leaky_alpha: float = 0.3,
    upsampling: str = "bilinear",
    bn_momentum: float = 0.99,
    name: str = "unet2d",
    num_outputs: int | None = None,
    deep_supervision: bool = False,
) -> keras.Model:
    """Build the U-Net; it accepts any H, W divisible by 2^(levels-1).

    The final 1x1 convolution has ``num_outputs`` channels (default ``num_classes``). With
    ``deep_supervision`` the model is the training model of :func:`deep_supervised`.
    """
    if upsampling not in ("bilinear", "nearest"):
        raise ValueError(f"unknown upsampling {upsampling!r}")
    scales = deep_supervision_scales(levels) if deep_supervision else ()
    if deep_supervision and not scales:
        raise ValueError(
            f"deep supervision needs at least 4 levels (a stage between full resolution and the coarsest), got {levels}"
        )
    stages = {}
    inputs = keras.Input(shape=(None, None, in_channels), name="image")
    x = inputs
    skips = []
    for level in range(levels):
        filters = base_filters * 2**level
        for b in range(blocks_per_level):
            x = conv_block(x, filters, block_order, leaky_alpha, f"enc{level}_{b}", bn_momentum)
        if level < levels - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    for level in reversed(range(levels - 1)):
        filters = base_filters * 2**level
        up = (
            BilinearUpsample2x(name=f"up{level}")
            if upsampling == "bilinear"
            else layers.UpSampling2D(2, name=f"up{level}")
        )
        x = up(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        for b in range(blocks_per_level):
            x = conv_block(x, filters, block_order, leaky_alpha, f"dec{level}_{b}", bn_momentum)
        stages[2**level] = x
    logits = layers.Conv2D(num_outputs or num_classes, 1, name="logits", dtype="float32")(x)
    if scales:
        return deep_supervised(inputs, logits, {s: stages[s] for s in scales}, name)
    return keras.Model(inputs, logits, name=name)


def deep_supervision_scales(levels: int) -> tuple[int, ...]:
    """Downsampling factors of the auxiliary outputs: the decoder stages between full resolution and the coarsest.

    nnU-Net v2 supervises every decoder stage (1, 1/2, ... 1/2^(levels-2)) with loss weights
    1/2^i, normalised, after setting the coarsest stage's weight to 0: that stage is left out here.
    """
    return tuple(2**k for k in range(1, levels - 2))


def deep_supervision_weights(n_aux: int) -> tuple[float, ...]:
    """Loss weights of the full-resolution output and ``n_aux`` auxiliary ones: 1/2^i, normalised to sum 1."""
    raw = [0.5**i for i in range(n_aux + 1)]
    return tuple(w / sum(raw) for w in raw)


def deep_supervised(inputs, logits, stages: dict, name: str) -> keras.Model:
    """The training model: the logits and, per scale s, a 1x1 head on the stage at 1/s, upsampled (nearest) by s,
    concatenated on the channel axis (``ds_packed``); :func:`inference_model` takes the logits back out."""
    packed = [logits]
    for s, stage in stages.items():
        head = layers.Conv2D(logits.shape[-1], 1, name=f"ds_logits{s}", dtype="float32")(stage)
        packed.append(layers.UpSampling2D(s, interpolation="nearest", name=f"ds_up{s}", dtype="float32")(head))
    return keras.Model(inputs, layers.Concatenate(name="ds_packed", dtype="float32")(packed), name=name)


def supervision_scales(model: keras.Model) -> tuple[int, ...]:
    """The auxiliary outputs' downsampling factors of a training model (empty without deep supervision)."""
    return tuple(int(layer.name[len("ds_logits") :]) for layer in model.layers if layer.name.startswith("ds_logits"))


def inference_model(model: keras.Model) -> keras.Model:
    """The plain U-Net (its full-resolution logits) of a deep-supervised training model; any other model as it is."""
    if not supervision_scales(model):
        return model
    return keras.Model(model.input, model.get_layer("logits").output, name=model.name)


def output_channels(num_classes: int, output_activation: str = "softmax") -> int:
    """Logits per pixel: one per class (softmax), one per foreground class (sigmoid) or nested region (regions)."""
    if output_activation == "softmax":
        return num_classes
    if output_activation in ("sigmoid", "regions"):
        return num_classes - 1
    raise ValueError(f"unknown output_activation {output_activation!r}")


def build_from_config(model_cfg: dict, num_classes: int, output_activation: str, training: bool = False) -> keras.Model:
    """Build the U-Net from the config's ``model`` section for the given output activation.

    ``training``: the training model (with the deep supervision heads where the config asks for them).
    """
    return build_unet(
        deep_supervision=training and model_cfg["deep_supervision"],
        num_outputs=output_channels(num_classes, output_activation),
        num_classes=num_classes,
        base_filters=model_cfg["base_filters"],
        levels=model_cfg["levels"],
        blocks_per_level=model_cfg["blocks_per_level"],
        block_order=model_cfg["block_order"],
        leaky_alpha=model_cfg["leaky_alpha"],
        upsampling=model_cfg["upsampling"],
        bn_momentum=model_cfg["bn_momentum"],
    )


def load_model(path, compile: bool = True) -> keras.Model:
    """Load a saved U-Net (safe mode) with this package's custom layers, loss, metrics and optimizer."""
    import kidney_seg.losses  # noqa: F401  (registers the custom loss and metrics)
    import kidney_seg.schedules  # noqa: F401  (registers TorchSGD, which a checkpoint's optimizer may be)

    return keras.models.load_model(path, compile=compile, safe_mode=True)


def input_divisor(model: keras.Model) -> int:
    """What the in-plane size of an input must be a multiple of: 2 to the number of 2x poolings."""
    return 2 ** sum(isinstance(layer, layers.MaxPooling2D) for layer in model.layers)
