"""Small members of the model families actfx must convert, defined here so tests need no torchvision.

Each factory returns (model, example input) at sizes that run in milliseconds on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self, bottleneck=False, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        if bottleneck:
            self.layers = nn.Sequential(Bottleneck(16, 8), Bottleneck(32, 16, 2))
            width = 64
        else:
            self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2))
            width = 32
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def vgg_bn():
    layers, cin = [], 3
    for cout in (16, "M", 32, "M"):
        if cout == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(True), nn.Dropout(0.5),
                          nn.Linear(64, 10))
    return model, torch.randn(4, 3, 16, 16)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


def mobilenet():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        InvertedResidual(8, 8, 1, 4), InvertedResidual(8, 16, 2, 4), InvertedResidual(16, 16, 1, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 10),
    )
    return model, torch.randn(4, 3, 32, 32)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv(F.relu(self.norm(x)))


class TinyDenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(8 + 4 * i, 4) for i in range(3)])
        self.norm = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), nn.GroupNorm(4, 16),
                                  nn.LeakyReLU(0.1))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.SiLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        u = self.up(e2)
        u2 = F.interpolate(e2, scale_factor=2.0, mode="bilinear", align_corners=False)
        d = self.dec(torch.cat([u + u2[:, :8], e1], 1))
        return self.head(d)


def mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Dropout(0.1), nn.Linear(128, 128),
                          nn.Tanh(), nn.Linear(128, 128), nn.Sigmoid(), nn.LayerNorm(128), nn.Linear(128, 10),
                          nn.LogSoftmax(dim=-1))
    return model, torch.randn(16, 8, 8)


class Functional(nn.Module):
    """Only functional ops and tensor methods: F.conv2d, torch.relu, x.relu_(), x @ y, operator.mul..."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.bn_w = nn.Parameter(torch.ones(8))
        self.bn_b = nn.Parameter(torch.zeros(8))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))
        self.w2 = nn.Parameter(torch.randn(32, 8 * 8 * 8) * 0.02)
        self.proj = nn.Parameter(torch.randn(32, 32) * 0.1)

    def forward(self, x):
        h = F.conv2d(x, self.w1, self.b1, padding=1)
        h = F.batch_norm(h, self.rm, self.rv, self.bn_w, self.bn_b, self.training, 0.1, 1e-5)
        h = torch.relu(h)
        h = F.max_pool2d(h, 2)
        h = h.flatten(1)
        h = F.linear(h, self.w2)
        g = torch.sigmoid(h) * h  # operator.mul of two activations
        g = g.relu_()
        a = g.unsqueeze(2) @ g.unsqueeze(1)  # batched outer product: matmul of two activations
        s = torch.softmax(a, dim=-1)
        out = (s @ self.proj).mean(1)
        out = out / (1.0 + out.abs())  # division by an activation
        return F.silu(out) + F.leaky_relu(out, 0.2) * F.dropout(out, 0.1, self.training)


class FunctionalNorms(nn.Module):
    """Normalisations in functional code whose shape is read from the input (``(h.shape[-1],)``,
    ``h.shape[-1:]``): fx records those sizes as nodes of the graph."""

    def __init__(self, d=32, h=64):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(h, h) / h**0.5)
        self.w3 = nn.Parameter(torch.randn(d, h) / h**0.5)
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(h)), nn.Parameter(torch.zeros(h))
        self.rms_w = nn.Parameter(torch.ones(h))
        self.gn_w, self.gn_b = nn.Parameter(torch.ones(h)), nn.Parameter(torch.zeros(h))

    def forward(self, x):
        h = F.layer_norm(F.linear(x, self.w1), (x.shape[-1] * 2,), self.ln_w, self.ln_b)
        h = F.rms_norm(F.gelu(F.linear(h, self.w2)), h.shape[-1:], self.rms_w)
        h = F.group_norm(h.transpose(1, 2), 4, self.gn_w, self.gn_b).transpose(1, 2)
        return F.linear(torch.tanh(h), self.w3)


FAMILIES = {
    "resnet_basic": lambda: (TinyResNet(False), torch.randn(4, 3, 16, 16)),
    "resnet_bottleneck": lambda: (TinyResNet(True), torch.randn(4, 3, 16, 16)),
    "vgg_bn": vgg_bn,
    "mobilenet_v2": mobilenet,
    "densenet": lambda: (TinyDenseNet(), torch.randn(4, 3, 16, 16)),
    "unet": lambda: (TinyUNet(), torch.randn(2, 3, 16, 16)),
    "mlp": mlp,
    "functional": lambda: (Functional(), torch.randn(4, 3, 16, 16)),
    "functional_norms": lambda: (FunctionalNorms(), torch.randn(4, 32, 32)),
}
