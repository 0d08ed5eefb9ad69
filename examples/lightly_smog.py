# lightly's SMoG example (examples/pytorch/smog.py in github.com/lightly-ai/lightly), laid out as lightly
# lays it out, with smog's grouping step in place of lightly's SMoGPrototypes and cross-entropy loss and
# smog's memory bank in place of lightly's. Every line that differs from lightly's example is marked
# "# smog:". It requires:
# pip install lightly
# pip install -e ".[examples]"   (smog, from this repository)
#
#   python examples/lightly_smog.py --steps 3                     # digits, on the CPU
#   python examples/lightly_smog.py --data fashion_mnist
#
# ruff: noqa: I001  (smog: the imports in lightly's order)

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU.

import argparse  # smog: --steps, --data, --batch-size, --workers, --reset-every
import copy

import torch
import torch.nn.functional as F  # smog: smog's grouping step takes L2-normalised rows
import torchvision
from PIL import Image  # smog: the small data sets' images as PIL images, as CIFAR-10 gives them
from torch import nn

from lightly.models import utils
from lightly.models.modules.heads import (
    SMoGPredictionHead,
    SMoGProjectionHead,
)
from lightly.transforms.smog_transform import SMoGTransform
from smog.config import DataConfig  # smog: digits or Fashion-MNIST in place of CIFAR-10
from smog.data import load_split  # smog
from smog_kernels import Grouping, MemoryBank  # smog: in place of SMoGPrototypes, MemoryBankModule

parser = argparse.ArgumentParser(description="lightly's SMoG example with smog's grouping step")  # smog
parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: 10 epochs)")  # smog
parser.add_argument("--data", default="digits", choices=["digits", "fashion_mnist"])  # smog
parser.add_argument("--batch-size", type=int, default=256)  # smog
parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (lightly: 8)")  # smog
parser.add_argument("--reset-every", type=int, default=300, help="steps between re-clusterings")  # smog
args = parser.parse_args()  # smog


class SMoGModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()

        self.backbone = backbone
        self.projection_head = SMoGProjectionHead(512, 2048, 128)
        self.prediction_head = SMoGPredictionHead(128, 2048, 128)

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)

        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)

        self.n_groups = 300
        # smog: one head of 300 groups: assignment, group update and loss in one module; the gradient
        # smog: reaches the predictions only, as in the authors' code (grad_groups=True: lightly's path
        # smog: through the updated groups into the encoded rows too)
        self.smog = Grouping(heads=1, num_groups=self.n_groups, dim=128, temperature=0.1)  # smog

    def reset_group_features(self, memory_bank):
        # see https://arxiv.org/pdf/2207.06167.pdf Table 7b)
        features = memory_bank.rows(0)  # smog: the bank's filled rows [n, 128]
        self.smog.recluster([features])  # smog: spherical k-means in place of scikit-learn's KMeans

    def reset_momentum_weights(self):
        # see https://arxiv.org/pdf/2207.06167.pdf Table 7b)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        utils.deactivate_requires_grad(self.backbone_momentum)
        utils.deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        features = self.backbone(x).flatten(start_dim=1)
        encoded = self.projection_head(features)
        predicted = self.prediction_head(encoded)
        return encoded, predicted

    def forward_momentum(self, x):
        features = self.backbone_momentum(x).flatten(start_dim=1)
        encoded = self.projection_head_momentum(features)
        return encoded


class SmallImages(torch.utils.data.Dataset):  # smog: the small data set, items as LightlyDataset's
    def __init__(self, images, labels, transform):  # smog: images uint8 [N, 1, H, W]
        self.images, self.labels, self.transform = images, labels, transform  # smog

    def __len__(self):  # smog
        return len(self.labels)  # smog

    def __getitem__(self, index):  # smog: (views, label, index): the index is the row's memory bank key
        image = Image.fromarray(self.images[index, 0].numpy()).convert("RGB")  # smog
        return self.transform(image), int(self.labels[index]), index  # smog


batch_size = args.batch_size  # smog: lightly: 256

resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = SMoGModel(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

# smog: the memory bank after the device, which it is made on
# memory bank because we reset the group features every 300 iterations
memory_bank_size = args.reset_every * batch_size  # smog: --reset-every (300)
memory_bank = MemoryBank(size=memory_bank_size, dim=128, views=1, device=device)  # smog

transform = SMoGTransform(
    crop_sizes=(32, 32),
    crop_counts=(1, 1),
    gaussian_blur_probs=(0.0, 0.0),
    crop_min_scales=(0.2, 0.2),
    crop_max_scales=(1.0, 1.0),
)
train = load_split(DataConfig(name=args.data), "train")  # smog: in place of CIFAR-10
dataset = SmallImages(train.images, train.labels, transform=transform)  # smog
# or create a dataset from a folder containing images or videos:
# dataset = LightlyDataset("path/to/folder", transform=transform)

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=batch_size,  # smog: --batch-size (256)
    shuffle=True,
    drop_last=True,
    num_workers=args.workers,  # smog: --workers (lightly: 8)
)

optimizer = torch.optim.SGD(
    model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6
)

global_step = 0

print("Starting Training")
for epoch in range(10):
    total_loss = 0
    for batch_idx, batch in enumerate(dataloader):
        (x0, x1) = batch[0]
        index = batch[2]  # smog: the dataset indices, the memory bank's keys

        if batch_idx % 2:
            # swap batches every second iteration
            x1, x0 = x0, x1

        x0 = x0.to(device)
        x1 = x1.to(device)

        if global_step > 0 and global_step % args.reset_every == 0:  # smog: --reset-every (300)
            # reset group features and weights every 300 iterations
            model.reset_group_features(memory_bank=memory_bank)
            model.reset_momentum_weights()
        else:
            # update momentum
            utils.update_momentum(model.backbone, model.backbone_momentum, 0.99)
            utils.update_momentum(
                model.projection_head, model.projection_head_momentum, 0.99
            )

        x0_encoded, x0_predicted = model(x0)
        x1_encoded = model.forward_momentum(x1)

        # smog: targets (the groups of x1_encoded under the groups before the update), the group update
        # smog: by x0_encoded, and the loss of x0_predicted against the updated groups, in one call;
        # smog: [1, N, 128] each: one target set, one set of update rows, one prediction view
        loss = model.smog(  # smog
            F.normalize(x1_encoded, dim=1)[None],  # smog
            F.normalize(x0_encoded, dim=1)[None],  # smog
            F.normalize(x0_predicted, dim=1)[None],  # smog
            beta=0.99,  # smog
        )  # smog

        # use memory bank to periodically reset the group features with k-means
        memory_bank.write(index, F.normalize(x0_encoded.detach(), dim=1)[None])  # smog

        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

        global_step += 1
        total_loss += loss.detach()
        if global_step == args.steps:  # smog: --steps
            break  # smog

    avg_loss = total_loss / (batch_idx + 1)  # smog: the batches run (--steps may end the epoch early)
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
    if global_step == args.steps:  # smog
        break  # smog
