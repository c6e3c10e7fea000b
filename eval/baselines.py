"""Offline baselines a stream's methods are compared with.

- reference: multinomial logistic regression on standardised backbone features of *all* the
  labelled stream data, its inverse regularisation C chosen by 5-fold cross-validation on those
  rows (grid REFERENCE_CS); scored on the stream's test part. A reference, not a ceiling: an
  online rule may beat it.
- pixels_lr / pixels_ncm: the same logistic regression, and the nearest class mean (Euclidean),
  on raw pixels (values / 255): what the backbone's features are worth.
- repeat_previous: the prequential accuracy of predicting, for every instance of a request, the
  last label revealed before that request (requests of `batch` instances). On class-correlated
  streams it is high without any learning; it stands beside every correlated-stream result.
"""

from __future__ import annotations

import warnings

import numpy as np

REFERENCE_CS = tuple(float(c) for c in np.logspace(-5, 3, 9))
REFERENCE_FOLDS = 5
REFERENCE_MAX_ITER = 500  # lbfgs iterations per fit (large C on separable folds otherwise runs long)


def _logistic_cv(x_train, y_train, x_test, y_test, cs=REFERENCE_CS) -> tuple[float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    folds = min(REFERENCE_FOLDS, int(np.bincount(y_train).min()))
    if folds < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        clf = LogisticRegressionCV(Cs=list(cs), cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                                   max_iter=REFERENCE_MAX_ITER).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean()), float(clf.C_[0])


def reference(f_train, y_train, f_test, y_test) -> tuple[float, float]:
    """(test accuracy, chosen C) of the cross-validated probe on backbone features."""
    return _logistic_cv(f_train, y_train, f_test, y_test)


def pixels_lr(img_train, y_train, img_test, y_test) -> tuple[float, float]:
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731
    return _logistic_cv(flat(img_train), y_train, flat(img_test), y_test)


def pixels_ncm(img_train, y_train, img_test, y_test) -> float:
    x = img_train.reshape(len(img_train), -1).astype(np.float32) / 255.0
    q = img_test.reshape(len(img_test), -1).astype(np.float32) / 255.0
    classes = np.unique(y_train)
    means = np.stack([x[y_train == c].mean(0) for c in classes])
    dist = (q ** 2).sum(1, keepdims=True) - 2 * q @ means.T + (means ** 2).sum(1)
    return float((classes[dist.argmin(1)] == y_test).mean())


def repeat_previous(labels_in_order: np.ndarray, batch: int) -> float:
    """Prequential accuracy of "the last label revealed before this request" (the first
    request has nothing to repeat and counts as wrong)."""
    n = len(labels_in_order)
    if n == 0:
        return float("nan")
    pred = np.full(n, -1)
    for start in range(batch, n, batch):
        pred[start:start + batch] = labels_in_order[start - 1]
    return float((pred == labels_in_order).mean())
