"""Constants shared by the video fine-tuning tests."""

# A Video CoSwin small enough for a training step in well under a second at 32 px.
VIDEO_CONFIG = {
    "img_size": 32,
    "embed_dim": 16,
    "depths": (1, 1),
    "num_heads": (2, 4),
    "window_size": (2, 4, 4),
    "stem_kernel_size": 3,
    "stem_stride": 2,
    "stem_padding": 1,
    "drop_path_rate": 0.0,
}

# Two short real clips that decode fast: a GIF of 79 frames and an AVI of 164 frames.
CLIPS = (("ucf101_v_CricketShot_g04_c01.gif", "cricket"), ("ucf101_apply_eye_makeup.avi", "eye makeup"))
