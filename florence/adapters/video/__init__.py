"""Video adapter: Video CoSwin inflated from the image model, video decoding and sampling."""

from florence.adapters.video.inflate import inflate_coswin, load_video_coswin
from florence.adapters.video.model import VideoCoSwin

__all__ = ["VideoCoSwin", "inflate_coswin", "load_video_coswin"]
