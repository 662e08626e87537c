"""Augmentation suited to face crops, applied to whole batches inside tf.data.

Faces are roughly aligned by the detector, so the geometry stays mild:
horizontal flips (expressions are left-right symmetric), rotations up to
about 10 degrees, 10% shifts and zooms (the detector's box jitter), lighting
changes (webcams and phones differ far more in exposure than in pose), and
cutout of one small patch (occlusion by hands, glasses, a headset's frame).
No vertical flips: an upside-down face is not a pose the edge will send.
"""

from __future__ import annotations

import math

import tensorflow as tf


class FaceAugment:
    def __init__(self, size: int, seed: int, *, max_rotation_deg: float = 10.0, max_shift: float = 0.1,
                 max_zoom: float = 0.1):
        self.size = size
        self.max_rotation = math.radians(max_rotation_deg)
        self.max_shift = max_shift * size
        self.max_zoom = max_zoom
        self._gen = tf.random.Generator.from_seed(seed)

    def __call__(self, x: tf.Tensor, *rest):
        """x: float32 batch (N, H, W, 1) of 0-255 pixels; other dataset elements pass through."""
        n = tf.shape(x)[0]
        x = self._affine(x, n)
        contrast = self._gen.uniform((n, 1, 1, 1), 0.7, 1.3)
        brightness = self._gen.uniform((n, 1, 1, 1), -25.0, 25.0)
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        x = tf.clip_by_value((x - mean) * contrast + mean + brightness, 0.0, 255.0)
        x = x * self._cutout_mask(n)
        return (x, *rest)

    def _affine(self, x, n):
        """Flip, rotate, zoom and shift in one resampling: chained transforms would blur the face each time."""
        u = lambda lo, hi: self._gen.uniform((n,), lo, hi)  # noqa: E731
        flip = tf.where(u(0.0, 1.0) < 0.5, -1.0, 1.0)
        angle = u(-self.max_rotation, self.max_rotation)
        scale = u(1.0 - self.max_zoom, 1.0 + self.max_zoom)
        tx, ty = u(-self.max_shift, self.max_shift), u(-self.max_shift, self.max_shift)
        c = (self.size - 1) / 2.0
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        # The matrix maps each output pixel to where it is sampled in the input.
        a0, a1, b0, b1 = flip * cos, -sin, flip * sin, cos
        a2 = c + tx - a0 * c - a1 * c
        b2 = c + ty - b0 * c - b1 * c
        zeros = tf.zeros_like(a0)
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=transforms, output_shape=tf.shape(x)[1:3], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="REFLECT",
        )

    def _cutout_mask(self, n):
        """Zero one square of a quarter of the side in half of the images."""
        side = self.size // 4
        cy = self._gen.uniform((n, 1, 1, 1), 0, self.size, dtype=tf.float32)
        cx = self._gen.uniform((n, 1, 1, 1), 0, self.size, dtype=tf.float32)
        on = tf.cast(self._gen.uniform((n, 1, 1, 1)) < 0.5, tf.float32)
        grid = tf.range(self.size, dtype=tf.float32)
        ys = tf.reshape(grid, (1, -1, 1, 1))
        xs = tf.reshape(grid, (1, 1, -1, 1))
        inside = tf.cast(tf.abs(ys - cy) < side / 2, tf.float32) * tf.cast(tf.abs(xs - cx) < side / 2, tf.float32)
        return 1.0 - inside * on
