"""What one request may ask for: checked before any image is decoded or any tensor allocated.

The defaults suit a shared machine; ``scripts/serve.py`` flags change each of them.
"""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(ValueError):
    """A request value the server refuses; answered as HTTP ``status`` naming ``field``."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one request.

    Attributes:
        max_body_bytes: the HTTP request body (base64 images included); larger bodies get 413.
        max_pixels: width x height of the generated image (also of the hires fix's second pass and
            of a decoded input image).
        max_side: the longest side of a generated or input image, in pixels.
        max_steps: sampling steps per pass.
        max_images: images per request (batch_size x n_iter).
        max_prompt_chars: characters of the prompt and of the negative prompt, each.
        max_queue: jobs waiting at once; one more gets 503.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 1024 * 1024
    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 16
    max_prompt_chars: int = 4000
    max_queue: int = 64

    def check_size(self, field: str, width: int, height: int) -> None:
        """``RequestError`` naming ``field`` unless ``width`` x ``height`` fits the pixel and side limits."""
        if width > self.max_side or height > self.max_side:
            raise RequestError(field, f"{width}x{height} has a side longer than this server's limit, "
                                      f"{self.max_side} pixels")
        if width * height > self.max_pixels:
            raise RequestError(field, f"{width}x{height} is {width * height} pixels, more than this server's "
                                      f"limit of {self.max_pixels}")

    def check_steps(self, field: str, steps: int) -> None:
        if steps > self.max_steps:
            raise RequestError(field, f"{steps} steps is more than this server's limit of {self.max_steps}")

    def check_images(self, batch_size: int, n_iter: int) -> None:
        if batch_size * n_iter > self.max_images:
            raise RequestError("batch_size", f"batch_size x n_iter = {batch_size * n_iter} images, more than "
                                             f"this server's limit of {self.max_images} per request")

    def check_prompt(self, field: str, text: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise RequestError(field, f"{len(text)} characters, more than this server's limit of "
                                      f"{self.max_prompt_chars}")
