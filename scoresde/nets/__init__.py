"""Score networks: time embeddings, a residual MLP for vectors, a DDPM++-style U-Net for images,
a small convolutional U-Net and a diffusion transformer (DiT).

Every network is ``net(x, t_in) -> tensor like x`` where ``t_in`` (shape ``(B,)``) is the network time
chosen by ``scoresde.model.ScoreModel.net_time``; the network does not know what its output means
(ε, score, ...): ``ScoreModel`` does.
"""

from .classifier import ConvClassifier, MLPClassifier
from .convnet import ConvScoreNet
from .ddpm import DDPM
from .dit import DiT
from .layers import GaussianFourierEmbedding, SinusoidalEmbedding, group_count
from .mlp import MLPScoreNet
from .ncsnpp import NCSNpp
from .unet import UNet

__all__ = ["SinusoidalEmbedding", "GaussianFourierEmbedding", "MLPScoreNet", "UNet", "group_count"]
__all__ += ["NCSNpp", "DDPM"]
__all__ += ["ConvScoreNet", "DiT"]
__all__ += ["ConvClassifier", "MLPClassifier"]
