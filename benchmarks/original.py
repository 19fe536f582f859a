"""The original tutorial script, end to end, as a baseline: python benchmarks/original.py [--csv ... --root ...]

A copy of the tutorial document's main() with only what it needs to run at all: the CSV-backed
MyDataset it never shows (PIL, RGB), the undefined `train_steps` (set to len(train_loader)), the class count
and paths as flags, and --image-size (its 224 and 256 scaled alike). Everything else is as written: one
dataset built with the training transform and split by an unseeded random_split (so validation images are
augmented too), fp32, `loss.item()` every step, a bare state_dict saved. Compare with `python train.py`:

    time python benchmarks/original.py --epochs 3
    time python train.py --epochs 3
"""

import argparse
import os
import time

import pandas as pd
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision.models as models
from PIL import Image
from torchvision import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MyDataset(torch.utils.data.Dataset):
    def __init__(self, csv_path, root, transform=None):
        table = pd.read_csv(csv_path, dtype=str)
        self.images = list(table.iloc[:, 0])
        self.class_names = sorted(set(table.iloc[:, 1]))
        self.labels = [self.class_names.index(label) for label in table.iloc[:, 1]]
        self.root = root
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = Image.open(os.path.join(self.root, self.images[index])).convert("RGB")
        return self.transform(image), self.labels[index]


def main(args):
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print("using {} device.".format(device))
    size, resize = args.image_size, int(args.image_size * 256 / 224)
    data_transform = {
        "train": transforms.Compose([transforms.RandomResizedCrop(size),
                                     transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
        "val": transforms.Compose([transforms.Resize(resize),
                                   transforms.CenterCrop(size),
                                   transforms.ToTensor(),
                                   transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])}  # fmt: skip
    dataset = MyDataset(args.csv, args.root, transform=data_transform["train"])
    train_size = int(len(dataset) * 0.7)
    val_size = len(dataset) - train_size
    train_dataset, val_dataset = torch.utils.data.random_split(dataset, [train_size, val_size])
    train_num = len(train_dataset)
    val_num = len(val_dataset)
    batch_size = 16
    nw = min([os.cpu_count(), batch_size if batch_size > 1 else 0, 8])  # number of workers
    print("Using {} dataloader workers every process".format(nw))
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=nw)
    validate_loader = torch.utils.data.DataLoader(val_dataset, batch_size=batch_size, shuffle=False, num_workers=nw)
    print("using {} images for training, {} images for validation.".format(train_num, val_num))

    net = models.resnet34()
    in_channel = net.fc.in_features
    net.fc = nn.Linear(in_channel, len(dataset.class_names))
    net.to(device)
    loss_function = nn.CrossEntropyLoss()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = optim.Adam(params, lr=0.0001)

    epochs = args.epochs
    best_acc = 0.0
    save_path = args.save_path
    train_steps = len(train_loader)
    for epoch in range(epochs):
        started = time.perf_counter()
        net.train()
        running_loss = 0.0
        for step, data in enumerate(train_loader):
            images, labels = data
            optimizer.zero_grad()
            logits = net(images.to(device))
            loss = loss_function(logits, labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            rate = (step + 1) / len(train_loader)
            a = "*" * int(rate * 50)
            b = "." * int((1 - rate) * 50)
            print("\rtrain loss: {:^3.0f}%[{}->{}]{:.4f}".format(int(rate * 100), a, b, loss), end="")
        net.eval()
        acc = 0.0
        with torch.no_grad():
            for val_data in validate_loader:
                val_images, val_labels = val_data
                outputs = net(val_images.to(device))
                predict_y = torch.max(outputs, dim=1)[1]
                acc += torch.eq(predict_y, val_labels.to(device)).sum().item()
        val_accurate = acc / val_num
        print("\n[epoch %d] train_loss: %.3f val_accuracy: %.3f  %.1fs"
              % (epoch + 1, running_loss / train_steps, val_accurate, time.perf_counter() - started))  # fmt: skip
        if val_accurate > best_acc:
            best_acc = val_accurate
            torch.save(net.state_dict(), save_path)
    print("Finished Training")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=os.path.join(REPO, "data", "labels.csv"), help="labels CSV")
    parser.add_argument("--root", default=os.path.join(REPO, "data", "images"), help="image folder")
    parser.add_argument("--epochs", type=int, default=3, help="epochs")
    parser.add_argument("--image-size", type=int, default=224, help="crop size (resize: size * 256 / 224)")
    parser.add_argument("--save-path", default="resNet34.pth", help="where the best state_dict goes")
    main(parser.parse_args())
