"""The evaluator architectures by name: the one home of the names, importable without torch (the CLI
lists them as the choices of `train-evaluator --arch`). networks.py builds them."""

RESNET18 = "resnet18"  # the course's architecture (official checkpoint format)
SMALL_CNN = "small-cnn"  # the toolkit's small network for the built-in synthetic data
ARCHS = (RESNET18, SMALL_CNN)
ARCH_NAMES = {RESNET18: "ResNet18", SMALL_CNN: "small CNN"}  # how reports name them
ARCH_DESCRIPTIONS = {
    RESNET18: "torchvision resnet18, random init, fc = Sequential(Linear(512, 24), Sigmoid())",
    SMALL_CNN: "small CNN: conv3x3 stride 2 x3 (3-16-32-64), conv3x3 64-128, conv1x1 128-256 (each with "
    "BatchNorm, ReLU), global max pool, fc = Sequential(Linear(256, 24), Sigmoid())",
}
