"""lora-merge --gguf: the merged model as one GGUF file (llama.cpp, Ollama, LM Studio), and --ollama's Modelfile.

GgufRequest is what lora-merge hands over: `check` runs before any merging (unknown type, architecture or
tokenizer: UserError, nothing written), then the export runs inside the merge's temporary output folder, so the
GGUF (and the Modelfile) appear with the rest of OUTPUT_DIR, atomically, or not at all. Modules: gguf_types (the
types and conversion), gguf_arch (names, keys, q/k permutation), gguf_tokenizer and gguf_sentencepiece
(vocabulary metadata), gguf_file (the streaming writer), modelfile (Ollama).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .gguf_arch import architecture_of
from .gguf_file import GgufWritten, TensorSource, folder_source, write_gguf
from .gguf_sentencepiece import find_sentencepiece_model
from .gguf_tokenizer import TokenizerMeta, tokenizer_metadata
from .gguf_types import TYPES, GgufType, parse_gguf_type
from .modelfile import MODELFILE_NAME, write_modelfile

__all__ = ["GgufRequest", "GgufWritten", "TensorSource", "TYPES", "parse_gguf_type", "gguf_file_name"]


def gguf_file_name(output_dir: Path, gtype: GgufType) -> str:
    """`<model-name>-<TYPE>.gguf`, the model named after its output folder."""
    return f"{Path(output_dir).name}-{gtype.name}.gguf"


@dataclass
class GgufRequest:
    gtype: GgufType
    only: bool = False  # --gguf-only: OUTPUT_DIR holds the GGUF (and Modelfile), no safetensors folder
    ollama: bool = False
    tokenizer_folders: tuple[Path, ...] = ()  # where a SentencePiece tokenizer.model may be found
    written: GgufWritten | None = None
    modelfile_warning: str | None = None

    @classmethod
    def from_options(cls, gguf: str | None, gguf_only: bool, ollama: bool) -> GgufRequest | None:
        from ..errors import UserError

        if gguf is None:
            if gguf_only or ollama:
                flag = "--gguf-only" if gguf_only else "--ollama"
                raise UserError(f"{flag} goes with --gguf TYPE (one of {', '.join(TYPES)}), e.g. "
                                f"lora-merge ADAPTER OUTPUT_DIR --gguf q8_0 {flag}")
            return None
        return cls(parse_gguf_type(gguf), only=gguf_only, ollama=ollama)

    def check(self, config, tokenizer, folders: tuple[Path, ...]) -> TokenizerMeta:
        """Refuse, before anything is merged or written, an architecture or tokenizer the export cannot write."""
        self.tokenizer_folders = tuple(Path(f) for f in folders if f is not None)
        architecture_of(config)
        return self._tokenizer_meta(tokenizer, config)

    def _tokenizer_meta(self, tokenizer, config, *extra_folders: Path) -> TokenizerMeta:
        sentencepiece = find_sentencepiece_model(*extra_folders, *self.tokenizer_folders)
        return tokenizer_metadata(tokenizer, config.vocab_size, sentencepiece)

    def export(self, folder: Path, output_dir: Path, source: TensorSource, config, tokenizer,
               log: Callable[[str], None]) -> GgufWritten:
        """Write the GGUF (and Modelfile) into `folder`, the temporary folder that becomes `output_dir`."""
        name = gguf_file_name(output_dir, self.gtype)
        meta = self._tokenizer_meta(tokenizer, config, folder)
        self.written = write_gguf(folder / name, source, config, meta, self.gtype, Path(output_dir).name, log)
        log(f"wrote {name}: {self.written.bytes / 2**20:,.1f} MB in {self.written.seconds:.1f} s")
        self.written.path = Path(output_dir) / name  # where it will be once the folder is published
        if self.ollama:
            result = write_modelfile(folder, name, tokenizer, meta.add_bos)
            self.modelfile_warning = result.warning
            log(f"wrote {MODELFILE_NAME} ({result.format} chat template)" if result.format
                else f"warning: {result.warning}")
        return self.written

    def export_folder(self, folder: Path, output_dir: Path, config, tokenizer, log: Callable[[str], None]) -> None:
        """From the merged model just written into `folder`; with --gguf-only, the merged files are removed after."""
        self.export(folder, output_dir, folder_source(folder), config, tokenizer, log)
        if self.only:
            keep = {self.written.path.name, MODELFILE_NAME}  # the GGUF and the Modelfile
            for entry in list(folder.iterdir()):
                if entry.name not in keep:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def plan_source(shapes: dict[str, tuple[int, ...]], produce: Callable[[str], torch.Tensor]) -> TensorSource:
    """A source made by the streaming merge itself (--gguf-only): each tensor merged as it is written."""
    return TensorSource(dict(shapes), produce)
