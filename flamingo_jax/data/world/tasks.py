"""One example of every dataset of the embedded world, from its generator.

Training data (image/video-text pairs, documents) and the evaluation tasks in
the paper's formats: captioning with several references (COCO-like), VQA with
ten annotator answers (VQAv2-like), video QA (MSRVTT-QA-like, one answer),
video captioning (VATEX-like), multiple-choice classification over a fixed
class list (ImageNet-like) and a nonce-word task solvable only in context.

Every function takes the example's generator (`scenes.example_rng`) and
returns plain Python/numpy values; images are uint8 [H, W, 3] arrays, videos
[T, H, W, 3]. `builders.py` turns them into TFDS features.

The nonce-word task: each episode binds `ways` freshly made-up words
("blicket", "zorpee": drawn from syllables, never a word of the grammar)
to as many values of one attribute (shapes, or colours), through `shots`
support images per word ("This is a blicket."); its queries show new objects
with one of those values, and the answer is the word. Bindings are drawn per
episode, so they cannot be memorised across episodes: the support has to be
read. The episode carries its own support (no separate support split).

Glossary of shapes:
  T: frames of a video.
  H, W: image height and width.
"""

from typing import Any

import numpy as np

from flamingo_jax.data.world import documents
from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import video as video_lib

NUM_CAPTIONS = 5  # Reference captions per image or video (for CIDEr).
NUM_ANSWERS = 10  # Annotator answers per VQA question (as VQAv2).
# Classification: the colour and shape of the single large object.
CLASS_NAMES = tuple(f'{c} {s}' for s in scenes.SHAPES
                    for c in scenes.COLOUR_NAMES)
MAX_DISTRACTORS = 3  # Small distractors around the classified object.
NONCE_WAYS = 3  # Words bound per episode.
NONCE_SHOTS = 2  # Support images per word.
NONCE_QUERIES = 4  # Query images per episode.
Example = dict[str, Any]


def _render(scene: scenes.Scene, image_size: int) -> np.ndarray:
  return scenes.render_scene(scene, image_size)


# ---------------------------------------------------------------- training --


def pair_example(rng: np.random.Generator, image_size: int) -> Example:
  """An image and one caption (ALIGN/LTIP-like)."""
  scene = scenes.sample_scene(rng)
  return {'image': _render(scene, image_size),
          'caption': language.caption(scene, rng)}


def video_pair_example(rng: np.random.Generator, image_size: int,
                       num_frames: int) -> Example:
  """A video and one caption (VTP-like)."""
  video = video_lib.sample_video(rng, num_frames=num_frames)
  return {'video': video_lib.render_video(video, image_size),
          'caption': video_lib.caption(video, rng)}


def document_example(rng: np.random.Generator, image_size: int) -> Example:
  """An interleaved page (M3W-like): its images [N, H, W, 3] and chunks."""
  doc = documents.sample_document(rng)
  images = np.stack([_render(s, image_size) for s in doc.scenes])
  return {'images': images, 'chunks': [dict(c) for c in doc.chunks]}


def text_example(rng: np.random.Generator) -> Example:
  """A page's text alone, images left out (the LM stage's text).

  Drawn with `documents.TEXT_PAGE_KINDS`; the text chunks are joined by
  single spaces.
  """
  doc = documents.sample_document(rng, shares=documents.TEXT_PAGE_KINDS)
  return {'text': ' '.join(c['text'].strip() for c in doc.chunks
                           if 'text' in c)}


# Whether the episodes' first showings (keyed in words, the word fresh) are
# learned. In the icl recipe (seed 0, one run each) learned, the binding
# probe moved from step 2000 on (margin 0.64 nats at 2600); not learned
# ('supervised': False), from about 2700 on (0.02 at 2600), though a small
# trainer on episodes alone, from a model trained on learned ones, bound 3x
# faster so. Predicting the key word from its picture at a first showing
# may be what teaches cross-attention to write the key (README).
LEARN_FIRST_SHOWINGS = True


def episode_example(rng: np.random.Generator, image_size: int,
                    learn_first_showings: bool = LEARN_FIRST_SHOWINGS
                    ) -> Example:
  """A bursty nonce episode (`nonce.episode`) as a document: its images
  [N, H, W, 3] and chunks, each picture followed by its line, each word's
  first line keyed in words (`Episode.first_keyed_texts`); with
  `learn_first_showings` False those lines are marked 'supervised': False
  (read, not learned: their words are fresh)."""
  ep = nonce.episode(rng)
  chunks = []
  for i, (first, text) in enumerate(zip(ep.first_showings(),
                                        ep.first_keyed_texts())):
    line = ({'text': text} if learn_first_showings or not first
            else {'text': text, 'supervised': False})
    chunks += [{'image': i}, line]
  return {'images': np.stack([_render(s, image_size) for s in ep.scenes]),
          'chunks': chunks}


def episode_text_example(rng: np.random.Generator) -> Example:
  """A bursty nonce episode for the LM alone (`nonce.episode_text`),
  keyed at its lines' starts or, in a share ADJACENT_SHARE, before its
  words."""
  ep = nonce.episode(rng)
  adjacent = bool(rng.random() < nonce.ADJACENT_SHARE)
  return {'text': nonce.episode_text(ep, adjacent=adjacent)}


# -------------------------------------------------------------- evaluation --


def caption_example(rng: np.random.Generator, image_size: int,
                    num_captions: int = NUM_CAPTIONS) -> Example:
  """An image and `num_captions` reference captions (COCO-like)."""
  scene = scenes.sample_scene(rng)
  return {'image': _render(scene, image_size),
          'captions': language.captions(scene, rng, num_captions)}


def vqa_example(rng: np.random.Generator, image_size: int,
                num_answers: int = NUM_ANSWERS) -> Example:
  """An image, a question, its answer and annotator answers (VQAv2-like)."""
  scene = scenes.sample_scene(rng)
  qa = questions.question(scene, rng)
  return {'image': _render(scene, image_size), 'question': qa.question,
          'answer': qa.answer, 'question_type': qa.qtype,
          'answers': questions.human_answers(qa.answer, qa.qtype, rng,
                                             num_answers)}


def video_qa_example(rng: np.random.Generator, image_size: int,
                     num_frames: int) -> Example:
  """A video, a question that needs several frames, and its answer."""
  video = video_lib.sample_video(rng, num_frames=num_frames)
  qa = video_lib.question(video, rng)
  return {'video': video_lib.render_video(video, image_size),
          'question': qa.question, 'answer': qa.answer,
          'question_type': qa.qtype}


def video_caption_example(rng: np.random.Generator, image_size: int,
                          num_frames: int,
                          num_captions: int = NUM_CAPTIONS) -> Example:
  """A video and `num_captions` reference captions (VATEX-like)."""
  video = video_lib.sample_video(rng, num_frames=num_frames)
  return {'video': video_lib.render_video(video, image_size),
          'captions': video_lib.captions(video, rng, num_captions)}


def classification_example(rng: np.random.Generator,
                           image_size: int) -> Example:
  """A large object to classify among CLASS_NAMES, with small distractors."""
  scene = scenes.sample_focus_scene(rng, max_distractors=MAX_DISTRACTORS)
  label_name = f'{scene.objects[0].colour} {scene.objects[0].shape}'
  return {'image': _render(scene, image_size),
          'label': CLASS_NAMES.index(label_name), 'label_name': label_name}


def nonce_episode(rng: np.random.Generator, image_size: int, *,
                  ways: int = NONCE_WAYS, shots: int = NONCE_SHOTS,
                  queries: int = NONCE_QUERIES) -> Example:
  """An episode of the nonce-word task.

  Args:
    rng: the episode's generator.
    image_size: image side in pixels.
    ways: words bound in the episode (<= 8).
    shots: support images per word.
    queries: query images.

  Returns:
    {'attribute': 'shape'|'colour', 'template': e.g. 'This is a {}.',
     'words': the episode's words, 'support' and 'query': lists of
     {'image', 'word', 'text', 'value'} (value: the bound shape or colour).}
  """
  if shots < 1 or queries < 1:
    raise ValueError(f'shots and queries must be >= 1; got {shots}, '
                     f'{queries}.')
  binding = nonce.bind(rng, ways, half='eval')  # Never a training word.
  template = language.pick(rng, nonce.TEMPLATES[binding.attribute])

  def item(way: int) -> dict[str, Any]:
    scene = nonce.scene(rng, binding.attribute, binding.values[way])
    return {'image': _render(scene, image_size), 'word': binding.words[way],
            'text': template.format(binding.words[way]),
            'value': binding.values[way]}

  support_ways = nonce.ways_order(rng, ways, shots)
  # Queries cycle through the ways, in random order, so each is asked.
  query_ways = np.concatenate([rng.permutation(ways)
                               for _ in range(-(-queries // ways))])[:queries]
  return {'attribute': binding.attribute, 'template': template,
          'words': list(binding.words),
          'support': [item(w) for w in support_ways],
          'query': [item(int(w)) for w in query_ways]}
