"""`QuietBuild`: the TFDS builder mixin for datasets that download nothing (synthetic and manual-dir ones)."""
from __future__ import annotations


class QuietBuild:
  """Mixin for builders that download nothing: TFDS's "Downloading and preparing dataset ..." banner would
  mislead; one line says where the dataset was written instead."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    config = f"/{self.builder_config.name}" if self.builder_config is not None else ""
    print(f"[trm_jax] prepared dataset {self.name}{config} in {self.data_dir}", flush=True)
