"""Type names shared by the compute modules."""

from __future__ import annotations

from typing import Any, TypeAlias

# An open_clip model (``CLIP``, ``CustomTextCLIP``) or one of its towers and blocks. torch types a
# module's submodules as ``Tensor | Module``, which cannot express "this block has an ``attn``
# with an ``in_proj_weight``"; the compute functions reach them by name, so they take ``Any``.
OpenClipModule: TypeAlias = Any
