"""`turbine up`: a frontend's options and the engine's, composed from the two configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from turbine.choices import ENGINES
from turbine.config.frontend import FrontendConfig
from turbine.config.options import opt
from turbine.config.runtime import RuntimeConfig
from turbine.config.worker import EngineOptions, WorkerConfig
from turbine.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class UpConfig(EngineOptions, FrontendConfig):
    """`turbine up`: the frontend's options and the engine's, which it hands to its workers."""

    engine: str = opt(
        "torch",
        "Engine of the workers: torch (a real model; default SmolLM2-135M-Instruct on the CPU), "
        "mocker (simulated, for load tests) or echo.",
        choices=ENGINES,
    )
    workers: int | None = opt(
        None, "Workers to start beside the frontend (default: torch 1, mocker 2).", min=1
    )

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 1 if self.engine == "torch" else 2

    def frontend_config(self) -> FrontendConfig:
        cfg = FrontendConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FrontendConfig)})
        # The torch workers publish the tokenizer and template; a .gguf is no directory for the frontend.
        return dataclasses.replace(cfg, model_path=None) if self.engine == "torch" else cfg

    def worker_config(self) -> WorkerConfig:
        """The workers': UP_WORKER_FIELDS and --num-workers from here, the rest their defaults."""
        return WorkerConfig(
            **{name: getattr(self, name) for name in UP_WORKER_FIELDS}, num_workers=self.num_workers
        )

    def validate(self) -> None:
        if self.is_gguf:
            # A .gguf file is for the workers; the frontend reads the files they publish.
            assert self.model_path is not None
            if self.engine != "torch":
                raise ConfigError("--model-path FILE.gguf needs --engine torch")
            if not Path(self.model_path).is_file():
                raise ConfigError(f"--model-path {self.model_path!r} does not exist")
            dataclasses.replace(self, model_path=None).validate()
            return
        super().validate()


# What `turbine up` decides for its workers: every runtime option but the dump, and the engine's.
UP_WORKER_FIELDS = tuple(
    field.name
    for field in (*dataclasses.fields(RuntimeConfig), *dataclasses.fields(EngineOptions))
    if field.name != "dump_config_to"
)
