"""The embedded world: procedurally generated multimodal data, no download.

The default data of every recipe, test and ablation: images, videos and
web-page-like documents of flat objects on a grid, with captions, questions
and few-shot tasks about them, generated deterministically from a seed with
numpy and Pillow and served as TFDS datasets. Importing this package
registers the builders with TFDS.

Build and read:

  python -m flamingo_jax.data.world --data_dir DIR [--sizes tiny]
  # or: flamingo_jax.data.world.build_all(DIR, sizes='tiny')
  ds = tfds.load('world_pairs', split='train', data_dir=DIR)  # 'default'
  ds = tfds.load('world_pairs/tiny', split='train', data_dir=DIR,
                 decoders={'image': tfds.decode.SkipDecoding()})  # PNG bytes

Modules: `scenes` (sampling and rendering), `language` (captions, parser),
`questions`, `video`, `nonce` (made-up words), `documents`, `tasks` (one
example of each dataset), `base` (what every TFDS builder shares: configs,
features, parallel generation), `builders` (the datasets' builders,
their registry, versioning), `build` (`build_all`: preparing them on disk).

THE WORLD
  objects  shape: circle square triangle star cross ring diamond hexagon
           colour: red orange yellow green blue purple pink brown
           size: small large; texture: plain striped dotted
  layout   a 3x3 grid, one object per cell, jittered inside it; regions are
           'top left', 'top', 'top right', 'left', 'centre', 'right',
           'bottom left', 'bottom', 'bottom right'
  scene    1-3 kinds (a kind = shape, colour, size, texture), 1-4 objects
           each, at most 6 objects; half the kinds differ from another by
           one attribute, so captions must name it
  image    uint8 RGB, 64x64 by default (any size >= 16; 320 predefined),
           over a light or dark grey with a tint and a linear gradient

CAPTIONS (language.py has the full grammar)
  NP  := COUNT [SIZE] [COLOUR] [TEXTURE] NOUN [LOCATION]
         'two large red striped squares on the left'; counts are exact
  caption := [PREFIX] NP, NP and NP [BACKGROUND]
           | [PREFIX] NP REL NP[, and NP] | NP is|are REL NP. There is ...
           | [In this picture,] there is|are NP ... | N objects: NP ... NP
  REL := to the left of | to the right of | above | below (+ synonyms),
         holding between every object of both phrases
  Synonyms: disc, plus sign, hoop, rhombus, violet, big, little, stripy,
  spotted, polka-dot, object/shape/thing. `language.parse` reads every
  caption back into (count, description), relations and background tone.

QUESTIONS (VQAv2-like short answers)
  colour ('What colour is the striped square?'), shape, size, texture,
  count ('2'), position (a region name), exists (yes/no), relation (yes/no,
  balanced). Ten annotator answers per question: ~78% the answer, ~15%
  synonyms ('two', 'big', 'center'), ~7% mistakes; >= 3 exact.

VIDEOS (video.py)
  8 frames at 4 fps (2 s); 1-3 events - move (1-2 cells, >= 2 frames),
  appear, disappear, recolour, grow, shrink - plus 0-3 static objects.
  Every event changes the first frame into a different last frame, so each
  caption ('A red circle turns blue.', 'First a star appears, then the
  square moves to the right.') and question ('How many objects appear?',
  'Which direction does the cross move?') needs more than one frame.

DOCUMENTS (documents.py; M3W-like)
  chunks [{'text': str} | {'image': i}]; four kinds of page:
  article (50%)  1-5 images (6-8 in 5% of pages) sharing a theme, after a
                 title and intro; each image described right after it ('The
                 picture above shows ...') or, 25% of the time, right before
                 it ('The next picture shows ...:'), comparisons with the
                 previous picture, filler sentences; 10% open with an image
  quiz (15%)     2-5 images, each followed by 'Question: ... Answer: ...'
                 (a second pair 20% of the time)
  gallery (15%)  2-5 images, each followed by 'Output: {caption}', or 30% of
                 the time 'Output: {colour} {shape}' of one large object
  words (20%)    2-3 fresh made-up words bound to shapes or colours,
                 listed first on 70% of pages; 4-5 one-object images,
                 each named ('This is a blicket.'); every word is shown
                 once, then reused
  The last three teach the few-shot formats and in-context binding, as
  real web pages do; the nonce task's episodes draw their own words.
  world_text holds pages' text alone (images left out, text joined by
  spaces), drawn 30/10/10/50% article/quiz/gallery/words: the LM stage's
  pretraining text. Its made-up words recur within a page and nowhere
  else, so predicting them teaches a small LM to copy from its context.

EPISODES (nonce.py; Chan et al. 2022's bursty sequences)
  2-4 fresh made-up words bound to shapes or colours, 4-9 one-object
  pictures in the few-shot format ('<image>This is a dax.<EOC>'), every
  word shown at least twice: after its first showing a word is known only
  from the earlier picture of the same value. Words come from the 'train'
  half of the word space, world_nonce's from the 'eval' half
  (`nonce.word_half`), so no evaluation word is ever trained on.
  world_episode_text: the same episodes for the LM alone, each picture
  replaced by its key (the value its word is bound to) at the start of its
  line, where <image> sits: 'circle This is a dax. square This is a ...'

DATASETS (`builders.DATASETS`; splits: default / tiny; 'id' = index)
  world_pairs           train 50_000/32, validation 1_000/8
                        image, caption
  world_video_pairs     train 10_000/16, validation 500/4
                        video [8, 64, 64, 3], caption
  world_documents       train 20_000/16, validation 500/4
                        images [N, 64, 64, 3], chunks {text, image (-1: text)}
  world_text            train 50_000/16, validation 500/4
                        text
  world_episodes        train 20_000/16, validation 500/4
                        images, chunks (bursty nonce episodes, below)
  world_episode_text    train 50_000/16, validation 500/4
                        text (the episodes, pictures put in words)
  world_captions        support 2_000/8, query 500/4
                        image, captions [5]
  world_vqa             support 5_000/8, query 1_000/4
                        image, question, answer, answers [10], question_type
  world_video_qa        support 1_000/8, query 500/4
                        video, question, answer, question_type
  world_video_captions  support 1_000/8, query 500/4
                        video, captions [5]
  world_classification  support 3_200/8, query 1_000/4
                        image, label (64 classes 'red circle', ...),
                        label_name
  world_nonce           query 500/4 episodes (each carries its support)
                        support [6] and query [4] of {image, word, text,
                        value}, words [3], attribute, template
  Configs: 'default' (the default), 'tiny', 'default_320px', 'tiny_320px';
  `builders.WorldConfig` takes other sizes, frame counts, seeds and
  per-split overrides. Example i of a split does not depend on the others,
  so 'tiny' is a prefix of 'default'. Building 'default' takes ~3.7 min on
  2 CPU cores (~290 MB; generation forks one worker per core, up to 16);
  'tiny' ~1 s (plus ~5 s to import TensorFlow).

VERSIONING
  `builders.VERSION` must be bumped whenever generation changes;
  `builders.generation_fingerprint()` hashes the generators' constants and
  sample outputs, and a test pins it with the version (see builders.py).
"""

from flamingo_jax.data.world.build import build_all
from flamingo_jax.data.world.build import make_builder
from flamingo_jax.data.world.builders import builder_class
from flamingo_jax.data.world.builders import DATASETS
from flamingo_jax.data.world.builders import generation_fingerprint
from flamingo_jax.data.world.builders import SIZES
from flamingo_jax.data.world.builders import VERSION
from flamingo_jax.data.world.builders import WorldConfig
