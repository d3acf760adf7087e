"""An encoder before its weights: what keys the cache and preprocesses images is known at once, the weights load behind.

`mmprep encode` reads the manifest, asks the index and fetches, decodes and preprocesses rows while a large
model's weights are still loading (minutes for a 7B checkpoint); only the model thread waits for them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from PIL import Image

from mmprep.errors import ModelLoadError
from mmprep.models.base import Encoder
from mmprep.models.fingerprint import weights_identity
from mmprep.models.preprocess import ImagePreprocessor
from mmprep.models.source import ModelSource, reason_of


class EncoderHandle:
    """A model's name, family, fingerprint and preprocessing, and its weights: loaded now or in the background."""

    def __init__(
        self, family: type[Encoder], source: ModelSource, config: Any, image_processor: Any, architecture: str,
        device: torch.device, dtype: torch.dtype, decode_options: dict[str, object],
    ) -> None:  # fmt: skip
        self.name = source.name
        self.family = family.family
        self._family = family
        self._args = (source, config, image_processor, architecture, device, dtype)
        self.decode_options = dict(decode_options)
        self.fingerprint, self.base_fingerprint = family.fingerprints_for(
            architecture, config, image_processor, dtype, weights_identity(source), self.decode_options
        )
        self._preprocessor: ImagePreprocessor = family.preprocessor_for(config, image_processor)
        self._done = threading.Event()
        self._encoder: Encoder | None = None
        self._error: ModelLoadError | None = None
        self._thread: threading.Thread | None = None
        self.load_seconds: float | None = None  # how long the weights took, once loaded

    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The model's image processor on one image (thread-safe; works while the weights load)."""
        return self._preprocessor(image)

    def input_size(self) -> tuple[int, int] | None:
        """The (W, H) every image is resized to (bounds --fast-decode); None for dynamic resolution."""
        return self._preprocessor.input_size()

    def start(self) -> None:
        """Load the weights on a background thread (once); `wait` returns the encoder."""
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self._load, name="mmprep-model-load", daemon=True)
            self._thread.start()

    def load(self) -> Encoder:
        """Load the weights on this thread (if not loaded or loading already) and return the encoder."""
        if self._thread is None and not self._done.is_set():
            self._load()
        encoder = self.wait()
        assert encoder is not None  # wait() without a timeout returns the encoder or raises
        return encoder

    def wait(self, timeout: float | None = None) -> Encoder | None:
        """The loaded encoder; None if still loading after `timeout` seconds; ModelLoadError if it failed."""
        if not self._done.wait(timeout):
            return None
        if self._error is not None:
            raise self._error
        return self._encoder

    def _load(self) -> None:
        started = time.monotonic()
        try:
            encoder = self._family.load(*self._args)
            encoder.set_decode_options(self.decode_options)
            if encoder.fingerprint != self.fingerprint:  # the files changed under us, or a family breaks the contract
                raise ModelLoadError(
                    f"model {self.name!r} changed while loading (its fingerprint is not the one the run started "
                    "with); run again"
                )
            self._encoder = encoder
            self.load_seconds = time.monotonic() - started
        except ModelLoadError as exc:
            self._error = exc
        except BaseException as exc:  # corrupt weights, incompatible config, out of memory, ...
            self._error = ModelLoadError(f"cannot load model {self.name!r}: {reason_of(exc)}")
            self._error.__cause__ = exc
        finally:
            self._done.set()
