"""Tiny recipes of further families (see tiny_kit.Recipe)."""

from __future__ import annotations

from tiny_kit import Recipe

RECIPES: dict[str, Recipe] = {}
