"""The paper's MNIST networks (Lan et al. 2019, section 3)."""
from torch import nn


class FC(nn.Sequential):
    """784-100-50-10, ReLU."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 100)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(100, 50)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(50, 10)


class LeNet(nn.Module):
    """LeNet: conv 5x5 (20) - pool - conv 5x5 (50) - pool - fc 500 - fc 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        return self.fc2(nn.functional.relu(self.fc1(x.flatten(1))))


MODELS = {"fc": FC, "lenet": LeNet}
