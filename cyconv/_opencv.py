"""OpenCV, imported without the change to os.environ that its import makes.

opencv-python's import adds its library folder to LD_LIBRARY_PATH, which every
child process would inherit; once its libraries are loaded the variable is of no
use to it, so cyconv puts the environment back as it was (importing cyconv
changes nothing in the process).  Every cyconv module takes cv2 from here.
"""
import os

_before = dict(os.environ)
import cv2  # noqa: E402

for _name in set(os.environ) - set(_before):
    del os.environ[_name]
os.environ.update({k: v for k, v in _before.items() if os.environ.get(k) != v})

__all__ = ["cv2"]
