"""actfx in a minute: convert a model, see what backward keeps, train as usual.

    python examples/quickstart.py
"""

import torch
import torch.nn.functional as F

import actfx
from actfx.accounting import count_saved
from actfx.models import resnet20

torch.manual_seed(0)
model = resnet20()  # any nn.Module; a CIFAR ResNet-20 here
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

# Same Parameters, same forward; backward reads 2-bit activations. The optimizer built on the
# original model keeps working, since the converted model shares its Parameters.
compressed = actfx.convert(model, bits=2)

images, labels = torch.randn(32, 3, 32, 32), torch.randint(10, (32,))
for name, net in (("plain PyTorch", model), ("actfx bits=2", compressed)):
    with count_saved(net) as saved:
        loss = F.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.zero_grad()
    print(f"{name:>14}: {saved.activation_bytes / 2**20:6.2f} MiB of activations kept for backward")

for step in range(5):
    loss = F.cross_entropy(compressed(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.3f}")
