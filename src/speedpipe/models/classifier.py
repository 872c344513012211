"""A small CNN digit classifier: the demo's feature extractor for FID/KID/precision-recall (and logits for IS).

Inception-v3 features say little about 32x32 digits; a classifier trained on the dataset itself gives
features that separate digit identity and stroke quality. Registered with torch-fidelity as
"speedpipe-classifier", with feature layers "features" (penultimate, 128-d) and "logits" (10 classes).
"""
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase


class DigitClassifier(nn.Module):
    feature_dim = 128

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, self.feature_dim, 3, padding=1), nn.BatchNorm2d(self.feature_dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        """x in [-1, 1] -> (features, logits)."""
        features = self.body(x)
        return features, self.head(features)


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper: uint8 NCHW images -> the requested classifier features."""

    NAME = "speedpipe-classifier"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("speedpipe-classifier needs feature_extractor_weights_path (the classifier stage's model.safetensors)")
        state = load_file(feature_extractor_weights_path)
        self.net = DigitClassifier(num_classes=state["head.weight"].shape[0])
        self.net.load_state_dict(state)
        self.net.eval().requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise ValueError(f"speedpipe-classifier expects uint8 images, got {x.dtype}")
        features, logits = self.net(x.float() / 127.5 - 1.0)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)
