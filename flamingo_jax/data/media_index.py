"""phi: for each text token, the media slot whose visual tokens it attends to.

The one place where phi is derived from the positions of the `<image>`
markers; the data pipeline and the inference prompt builder both call
`compute_media_index`, and the model only reads the result (paper §2.3,
App. A.3.2). Runs on host numpy arrays, before batching into jax; it lives
in data/, the lowest room that needs it (the data never imports the models).

Slots are 1-based in order of appearance; 0 means "no medium".
- Previous-image mode (the default): a token attends to the last marker at or
  before it, the marker itself included; tokens before the first marker get 0.
- Next-image mode (the p_next draw, Table 10 iii): a token attends to the first
  marker at or after it; tokens after the last marker get 0.

Glossary of shapes:
  B: batch size.
  L: sequence length.
"""

import numpy as np


def compute_media_index(
    is_marker: np.ndarray,  # [B, L] or [L] bool: where the <image> markers are
    num_media: np.ndarray | int,  # [B] or scalar: media actually supplied
    attend_next: np.ndarray | bool = False,  # [B] or scalar: the p_next draw
) -> np.ndarray:  # [B, L] (or [L]) int32
  """Returns phi; raises ValueError if a row has more markers than media."""
  is_marker = np.asarray(is_marker, dtype=bool)
  squeeze = is_marker.ndim == 1
  if squeeze:
    is_marker = is_marker[None]
  if is_marker.ndim != 2:
    raise ValueError('is_marker must have shape [B, L] or [L]; got shape '
                     f'{is_marker.shape}.')
  batch = is_marker.shape[0]
  num_media = np.broadcast_to(np.asarray(num_media), (batch,))
  attend_next = np.broadcast_to(np.asarray(attend_next, dtype=bool), (batch,))

  num_markers = is_marker.sum(axis=1)  # [B]
  too_many = np.nonzero(num_markers > num_media)[0]
  if too_many.size:
    row = int(too_many[0])
    raise ValueError(
        f'Sequence {row} has {int(num_markers[row])} <image> markers but only '
        f'{int(num_media[row])} media were given: expected at most as many '
        'markers as media.')

  previous = np.cumsum(is_marker, axis=1)  # [B, L]
  # The next marker's slot is the count of markers strictly before t, plus 1
  # if t is itself a marker or one follows; 0 once none follows.
  before = previous - is_marker  # [B, L]
  remaining = num_markers[:, None] - before  # [B, L]
  following = np.where(remaining > 0, before + 1, 0)  # [B, L]
  phi = np.where(attend_next[:, None], following, previous).astype(np.int32)
  return phi[0] if squeeze else phi
