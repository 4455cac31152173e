"""Classical baselines on vitkit's built-in splits: what `vitkit train` has to beat.

The same train/test split `vitkit train --data NAME` uses (`vitkit.data.builtin`: stratified
80/20, seed 0). Each model's hyper-parameters are chosen by 5-fold cross-validation on the
training part only, and the test part is scored once. The last column is the best test accuracy
any point of the grid reaches. It is picked on the test set, so it is an upper bound on what that
model could report, not a result. Pixels in [0, 1], as the ViT sees them.

    PYTHONPATH=src python benchmarks/baselines.py                 # digits and mnist
    PYTHONPATH=src python benchmarks/baselines.py --datasets digits
"""

from __future__ import annotations

import argparse
import time

from common import machine_info, machine_line
from vitkit.data.builtin import load_builtin


def baselines() -> dict:
    """name -> (estimator, grid searched on the training part)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    return {
        "RBF SVM": (
            SVC(kernel="rbf"),
            {"C": [1, 3, 10, 30], "gamma": ["scale", 0.01, 0.03, 0.1, 0.3]},
        ),
        "k-NN": (KNeighborsClassifier(), {"n_neighbors": [1, 3, 5], "weights": ["distance"]}),
        "logistic regression": (LogisticRegression(max_iter=2000), {"C": [0.1, 1, 10]}),
    }


def main(argv: list[str] | None = None) -> int:
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, ParameterGrid

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits,mnist")
    args = p.parse_args(argv)
    import sklearn

    print(machine_line(machine_info()) + f", scikit-learn: {sklearn.__version__}")
    print("| dataset | model | chosen (5-fold CV on train) | test accuracy | fit s "
          "| best grid point on test (upper bound) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|")
    for name in args.datasets.split(","):
        train, test = load_builtin(name)
        xtr, ytr = train.images.flatten(1).numpy(), train.labels.numpy()
        xte, yte = test.images.flatten(1).numpy(), test.labels.numpy()
        for model, (estimator, grid) in baselines().items():
            start = time.perf_counter()
            search = GridSearchCV(estimator, grid, cv=5, n_jobs=-1).fit(xtr, ytr)
            seconds = time.perf_counter() - start
            acc = float((search.predict(xte) == yte).mean())
            chosen = ", ".join(f"{k}={v}" for k, v in search.best_params_.items())
            bound = max(
                float(
                    (clone(estimator).set_params(**point).fit(xtr, ytr).predict(xte) == yte).mean()
                )
                for point in ParameterGrid(grid)
            )
            print(f"| {name} ({len(ytr):,d} / {len(yte):,d}) | {model} | {chosen} | "
                  f"{acc:.2%} | {seconds:.1f} | {bound:.2%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
