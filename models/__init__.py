"""Flax NNX models (the MoE routers and layers are in ``models.moe``)."""

from models.biformer import BiLevelRoutingAttention as BiLevelRoutingAttention
from models.biformer import (
    load_official_bra_weights as load_official_bra_weights,
)
from models.levels import ArchParam as ArchParam
from models.levels import GraphParam as GraphParam
from models.levels import Levels as Levels
from models.levels import merge_levels as merge_levels
from models.levels import split_levels as split_levels
from models.levels import updated_rest as updated_rest
from models.macs import count_macs as count_macs
from models.masking import MASK_MODES as MASK_MODES
from models.masking import MaskedConv as MaskedConv
from models.masking import MaskedLinear as MaskedLinear
from models.masking import MaskFn as MaskFn
from models.masking import MaskScore as MaskScore
from models.masking import identity_mask as identity_mask
from models.masking import score_shape as score_shape
from models.masking import sparsity as sparsity
from models.mlp import MLP as MLP
from models.moe_lm import MoeLM as MoeLM
from models.moe_lm import MoeLMConfig as MoeLMConfig
from models.moe_lm import active_params as active_params
from models.resnet_cifar import VALID_DEPTHS as VALID_DEPTHS
from models.resnet_cifar import ResNetCIFAR as ResNetCIFAR
from models.resnet_cifar import SmallCNN as SmallCNN
from models.sharding import LOGICAL_RULES as LOGICAL_RULES
from models.sharding import batch_sharding as batch_sharding
from models.sharding import bytes_per_device as bytes_per_device
from models.sharding import logical_spec as logical_spec
from models.sharding import make_mesh as make_mesh
from models.sharding import shard_batch as shard_batch
from models.sharding import tree_shardings as tree_shardings
