"""Train a small CNN on scikit-learn's bundled digits (8x8 images, no download) with model.fit.

Run: python examples/train_digits.py   (about 5-10 s on 2 CPU cores; test accuracy >= 95%)
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import torchgraph as tg


def build_model() -> tg.Model:
    x = tg.Input(shape=(1, 8, 8), name="image")
    h = F.relu(nn.Conv2d(1, 16, 3, padding=1)(x))
    h = F.max_pool2d(F.relu(nn.Conv2d(16, 32, 3, padding=1)(h)), 2)   # (None, 32, 4, 4)
    h = nn.Dropout(0.2)(torch.flatten(h, 1))
    y = nn.Linear(64, 10)(F.relu(nn.Linear(32 * 4 * 4, 64)(h)))
    return tg.Model(x, y, name="DigitsCNN")


def load_data():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, random_state=0,
                                                        stratify=labels)
    return x_train, x_test, y_train, y_test


def main() -> float:
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = load_data()
    model = build_model()
    # A torch.optim optimizer works as is ("adam" would use Adam with lr=1e-3).
    model.compile(optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), loss="cross_entropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=32, epochs=15, validation_split=0.1,
              callbacks=[tg.callbacks.EarlyStopping(monitor="val_loss", patience=3,
                                                    restore_best_weights=True)])
    took = time.perf_counter() - start
    result = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {result['accuracy']:.4f} (test loss {result['loss']:.4f}; trained in {took:.1f} s)")
    predicted = model.predict(x_test[:10]).argmax(1)
    print(f"first predictions: {predicted.tolist()} (true: {y_test[:10].tolist()})")
    return result["accuracy"]


if __name__ == "__main__":
    main()
