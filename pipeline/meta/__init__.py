"""Meta-learning with torch.func: MAML (second order), first-order MAML, ANIL, Reptile, Meta-SGD and ProtoNet.

MLflow-free and CLI-free. `inner`: the one inner loop (`adapt`, a pure function of a parameter dict) and its reverse
sweep; `layers`: the BatchNorm policy and the depthwise double backward, applied to the meta-trained model only;
`algorithms`: one class per algorithm; `training`: the meta-training loop with its resume (used by the meta stage).
"""
from .algorithms import (ALGORITHMS, ANIL, MAML, MetaLearner, MetaSGD, ProtoNet, Reptile, create_learner,
                         prototype_linear, prototype_logits)
from .inner import Params, adapt, adapt_vjp, hvp
from .layers import _DepthwiseConv2d, batch_stats_only, composite_batch_norm, depthwise_double_backward, recalibrate_bn

__all__ = ["ALGORITHMS", "ANIL", "MAML", "MetaLearner", "MetaSGD", "Params", "ProtoNet", "Reptile", "_DepthwiseConv2d",
           "adapt", "adapt_vjp", "batch_stats_only", "composite_batch_norm", "create_learner",
           "depthwise_double_backward", "hvp", "prototype_linear", "prototype_logits", "recalibrate_bn"]
