"""Flax NNX models."""

from models.mlp import MLP as MLP
