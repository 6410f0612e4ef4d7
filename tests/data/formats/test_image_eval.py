"""coco_karpathy, vqa and image_folder in their published layouts."""

import json

import numpy as np
import pytest

from flamingo_jax.data.formats import image_eval
from flamingo_jax.evaluation import vqa
from tests.data.formats import util

IMAGES = [util.image(seed, 16, 16) for seed in range(8)]


def _coco_image(i, split, sentences):
  return {'filepath': 'val2014', 'filename': f'COCO_val2014_{i:012d}.jpg',
          'imgid': i, 'split': split, 'cocoid': 1000 + i,
          'sentences': [{'raw': s, 'tokens': s.split()} for s in sentences]}


def test_coco_karpathy_read_back_as_written(tmp_path):
  src = tmp_path / 'coco'
  for i in range(4):
    util.write(src / 'images' / 'val2014' / f'COCO_val2014_{i:012d}.jpg',
               util.encode(IMAGES[i]))  # PNG bytes with a .jpg name: kept.
  images = [_coco_image(0, 'train', ['A cat.', 'A small cat. ']),
            _coco_image(1, 'restval', ['A dog.']),
            _coco_image(2, 'test', ['Two birds.', ' ', 'Birds on a wire.']),
            _coco_image(3, 'val', ['A boat.'])]
  util.write(src / 'dataset_coco.json',
             json.dumps({'dataset': 'coco', 'images': images}))
  builder, stats = util.build('coco_karpathy', src, tmp_path / 'out',
                              image_dir=src / 'images')
  assert stats == {'support': {'examples': 2}, 'validation': {'examples': 1},
                   'query': {'examples': 1, 'dropped_caption/empty': 1}}
  (query,) = builder.as_data_source(split='query')
  assert [util.text(c) for c in query['captions']] == ['Two birds.',
                                                       'Birds on a wire.']
  assert query['id'] == 1002
  np.testing.assert_array_equal(query['image'], IMAGES[2])
  support = {e['id']: e for e in builder.as_data_source(split='support')}
  assert [util.text(c) for c in support[1000]['captions']] == [
      'A cat.', 'A small cat.']


def _coco_captions_json(subset, images, captions):
  """{info, licenses, images, annotations}, as annotations/captions_*.json."""
  return json.dumps({
      'info': {'description': 'COCO 2014 Dataset', 'version': '1.0',
               'year': 2014, 'contributor': 'COCO Consortium',
               'date_created': '2017/09/01'},
      'licenses': [{'url': 'http://creativecommons.org/licenses/by-nc-sa/2.0/',
                    'id': 1, 'name': 'Attribution-NonCommercial-ShareAlike'}],
      'images': [{'license': 1, 'file_name': f'COCO_{subset}_{i:012d}.jpg',
                  'coco_url': f'http://images.cocodataset.org/{subset}/'
                              f'COCO_{subset}_{i:012d}.jpg',
                  'height': 16, 'width': 16,
                  'date_captured': '2013-11-14 16:28:13',
                  'flickr_url': 'http://farm7.staticflickr.com/x.jpg', 'id': i}
                 for i in images],
      'annotations': [{'image_id': i, 'id': 9000 + k, 'caption': caption}
                      for k, (i, caption) in enumerate(captions)]})


def test_coco_captions_json_read_back_as_written(tmp_path):
  src = tmp_path / 'coco'
  for subset, images in (('train2014', [1, 2]), ('val2014', [3, 4, 5])):
    for i in images:
      util.write(src / subset / f'COCO_{subset}_{i:012d}.jpg',
                 util.encode(IMAGES[i]))
  util.write(src / 'annotations' / 'captions_train2014.json',
             _coco_captions_json('train2014', [1, 2], [
                 (2, 'A dog.'), (1, 'A cat.'), (1, 'A small cat. ')]))
  # Image 5 has only a blank caption: with on_error='skip', skipped.
  util.write(src / 'annotations' / 'captions_val2014.json',
             _coco_captions_json('val2014', [3, 4, 5], [
                 (4, 'Two birds.'), (3, 'A boat.'), (4, ' '),
                 (4, 'Birds on a wire.'), (5, '  ')]))
  builder, stats = util.build('coco_captions_json', src, tmp_path / 'out',
                              on_error='skip')
  assert stats == {'support': {'examples': 2},
                   'query': {'examples': 2, 'dropped_caption/empty': 1,
                             'skipped/empty_caption': 1}}
  query = {e['id']: e for e in builder.as_data_source(split='query')}
  assert sorted(query) == [3, 4]
  assert [util.text(c) for c in query[4]['captions']] == [
      'Two birds.', 'Birds on a wire.']
  np.testing.assert_array_equal(query[4]['image'], IMAGES[4])
  support = {e['id']: e for e in builder.as_data_source(split='support')}
  assert [util.text(c) for c in support[1]['captions']] == [
      'A cat.', 'A small cat.']
  with pytest.raises(ValueError, match=r'captions_val2014\.json:images\[2\] '
                     r'\(id 5\): no non-empty caption'):
    util.build('coco_captions_json', src, tmp_path / 'strict',
               subsets={'query': 'val2014'})


def _vqa_files(src, subset, prefix, image_ids, with_mc=True):
  questions = [{'image_id': image_id, 'question': f'What is {n}?',
                'question_id': image_id * 10 + n}
               for image_id in image_ids for n in range(2)]
  annotations = []
  for q in questions:
    answers = ['red'] * 3 + ['blue'] * 6 + ['green']
    a = {'question_id': q['question_id'], 'image_id': q['image_id'],
         'question_type': 'what is', 'answer_type': 'other',
         'answers': [{'answer': x, 'answer_id': k + 1,
                      'answer_confidence': 'yes'}
                     for k, x in enumerate(answers)]}
    if with_mc:
      a['multiple_choice_answer'] = 'red'
    annotations.append(a)
  util.write(src / f'{prefix}OpenEnded_mscoco_{subset}_questions.json',
             json.dumps({'data_subtype': subset, 'questions': questions}))
  util.write(src / f'{prefix}mscoco_{subset}_annotations.json',
             json.dumps({'annotations': annotations}))


def test_vqa_read_back_as_written(tmp_path):
  src = tmp_path / 'vqa'
  _vqa_files(src, 'train2014', 'v2_', [1])
  _vqa_files(src, 'val2014', 'v2_', [2, 3], with_mc=False)  # As OK-VQA.
  util.write(src / 'coco' / 'train2014' / 'COCO_train2014_000000000001.jpg',
             util.encode(IMAGES[1], 'JPEG'))
  for i in (2, 3):
    util.write(src / 'coco' / f'COCO_val2014_{i:012d}.jpg',
               util.encode(IMAGES[i]))
  builder, stats = util.build('vqa', src, tmp_path / 'out',
                              image_dir=src / 'coco')
  assert stats == {'support': {'examples': 2}, 'query': {'examples': 4}}
  query = {e['id']: e for e in builder.as_data_source(split='query')}
  assert sorted(query) == [20, 21, 30, 31]
  example = query[31]
  assert util.text(example['question']) == 'What is 1?'
  assert util.text(example['answer']) == 'blue'  # The majority answer.
  assert len(example['answers']) == 10
  assert util.text(example['question_type']) == 'what is'
  np.testing.assert_array_equal(example['image'], IMAGES[3])
  (support, _) = builder.as_data_source(split='support')
  assert util.text(support['answer']) == 'red'  # multiple_choice_answer.
  np.testing.assert_array_equal(support['image'], util.decode(
      util.encode(IMAGES[1], 'JPEG')))


def test_vqa_missing_image_is_an_error_by_default(tmp_path):
  src = tmp_path / 'vqa'
  _vqa_files(src, 'val2014', '', [7])
  with pytest.raises(ValueError, match=r'questions\.json\[0\] \(question_id '
                     r'70\): Image file .*COCO_val2014_000000000007\.jpg '
                     r'does not exist'):
    util.build('vqa', src, tmp_path / 'out', subsets={'query': 'val2014'})


def test_okvqa_keeps_raw_answers_and_vqav2_test_dev_has_questions_only(
    tmp_path):
  src = tmp_path / 'vqa'
  raw = ['racing'] * 6 + ['races', 'race', 'drag racing', 'speed']
  stemmed = ['race'] * 8 + ['drag race', 'speed']
  util.write(src / 'OpenEnded_mscoco_val2014_questions.json', json.dumps(
      {'questions': [{'image_id': 5, 'question': 'What sport?',
                      'question_id': 51}]}))
  util.write(src / 'mscoco_val2014_annotations.json', json.dumps(
      {'annotations': [{
          'question_id': 51, 'image_id': 5, 'question_type': 'eight',
          'answer_type': 'other', 'confidence': 2,
          'answers': [{'answer_id': k + 1, 'raw_answer': r, 'answer': a,
                       'answer_confidence': 'yes'}
                      for k, (r, a) in enumerate(zip(raw, stemmed))]}]}))
  util.write(src / 'val2014' / 'COCO_val2014_000000000005.jpg',
             util.encode(IMAGES[5]))
  # VQAv2 test-dev: a questions file, images in test2015, no annotations.
  util.write(src / 'v2_OpenEnded_mscoco_test-dev2015_questions.json',
             json.dumps({'questions': [{'image_id': 6, 'question': 'Why?',
                                        'question_id': 60}]}))
  util.write(src / 'test2015' / 'COCO_test2015_000000000006.jpg',
             util.encode(IMAGES[6]))
  builder, stats = util.build('vqa', src, tmp_path / 'out', subsets={
      'query': 'val2014', 'test': 'test-dev2015'})
  assert stats == {'query': {'examples': 1}, 'test': {'examples': 1}}
  (example,) = builder.as_data_source(split='query')
  answers = [util.text(a) for a in example['answers']]
  raw_answers = [util.text(a) for a in example['raw_answers']]
  assert (answers, raw_answers) == (stemmed, raw)
  assert util.text(example['answer_type']) == 'other'
  assert vqa.vqa_accuracy('racing', answers, stem=True,
                          raw_answers=raw_answers) == 1.0
  assert vqa.vqa_accuracy('drag racing', answers, stem=True,
                          raw_answers=raw_answers) == 0.3
  assert vqa.vqa_accuracy('racing', answers) == 0.0  # Unstemmed: no match.
  (test,) = builder.as_data_source(split='test')
  assert (test['id'], list(test['answers'])) == (60, [])
  np.testing.assert_array_equal(test['image'], IMAGES[6])
  results = vqa.vqa_results([int(test['id'])], ['Because.\n'],
                            tmp_path / 'results.json')
  assert json.loads((tmp_path / 'results.json').read_text()) == results == [
      {'question_id': 60, 'answer': 'Because.'}]


def test_majority_answer_prefers_the_first_of_ties():
  assert image_eval.majority_answer(['b', 'a', 'a', 'b', 'c']) == 'b'


def test_image_folder_read_back_as_written(tmp_path):
  src = tmp_path / 'imagenet'
  layout = {'train': {'n02': [0, 1], 'n01': [2]}, 'val': {'n01': [3],
                                                          'n03': [4]}}
  for split, classes in layout.items():
    for folder, images in classes.items():
      for i in images:
        util.write(src / split / folder / f'{i}.JPEG',
                   util.encode(IMAGES[i], 'JPEG'))
  util.write(src / 'val' / 'n03' / 'bad.JPEG', b'\xff\xd8 truncated')
  util.write(src / 'val' / 'README.txt', 'not an image folder')
  util.write(src / 'LOC_synset_mapping.txt',
             'n01 tench, Tinca tinca\nn02 goldfish\nn03 great white shark\n')
  builder, stats = util.build('image_folder', src, tmp_path / 'out',
                              class_names=src / 'LOC_synset_mapping.txt',
                              on_error='skip')
  assert stats == {'support': {'examples': 3},
                   'query': {'examples': 2, 'skipped/corrupt_image': 1}}
  assert builder.info.features['label'].names == ['n01', 'n02', 'n03']
  assert builder.info.metadata['label_names'] == [
      'tench, Tinca tinca', 'goldfish', 'great white shark']
  query = util.by_source(builder.as_data_source(split='query'))
  example = query[f'{src}/val/n03/4.JPEG']
  assert example['label'] == 2
  assert util.text(example['label_name']) == 'great white shark'
  np.testing.assert_array_equal(example['image'], util.decode(
      util.encode(IMAGES[4], 'JPEG')))


def test_image_folder_names_from_a_clean_list_of_one_name_per_class(
    tmp_path, caplog):
  src = tmp_path / 'imagenet'
  for i, folder in enumerate(['n02', 'n01', 'n03']):
    util.write(src / 'val' / folder / f'{i}.png', util.encode(IMAGES[i]))
  # Label order is the sorted folders: n01, n02, n03.
  util.write(src / 'classnames.txt', 'tench\ngoldfish\ngreat white shark\n')
  util.write(src / 'classnames.json', json.dumps(['tench', 'goldfish',
                                                  'great white shark']))
  for i, names in enumerate(('classnames.txt', 'classnames.json')):
    builder, _ = util.build('image_folder', src, tmp_path / f'out{i}',
                            splits={'query': 'val'}, class_names=src / names)
    assert builder.info.metadata['label_names'] == [
        'tench', 'goldfish', 'great white shark']
    query = util.by_source(builder.as_data_source(split='query'))
    assert util.text(query[f'{src}/val/n01/1.png']['label_name']) == 'tench'
  # WordNet synonym strings still work, with a warning to use a clean list.
  util.write(src / 'LOC_synset_mapping.txt', 'n01 tench, Tinca tinca\n'
             'n02 goldfish, Carassius auratus\nn03 great white shark\n'
             'n04 not here\n')
  caplog.clear()
  builder, _ = util.build('image_folder', src, tmp_path / 'loc',
                          splits={'query': 'val'},
                          class_names=src / 'LOC_synset_mapping.txt')
  assert builder.info.metadata['label_names'] == [
      'tench, Tinca tinca', 'goldfish, Carassius auratus', 'great white shark']
  assert '2 of 3 class names are lists of synonyms' in caplog.text
  util.write(src / 'short.txt', 'tench\ngoldfish\n')
  with pytest.raises(ValueError, match=r'short\.txt lists 2 class names .* '
                     r'but there are 3 class folders'):
    util.build('image_folder', src, tmp_path / 'short',
               splits={'query': 'val'}, class_names=src / 'short.txt')


def test_image_folder_errors(tmp_path):
  util.write(tmp_path / 'src' / 'dogs' / '0.png', util.encode(IMAGES[0]))
  util.write(tmp_path / 'names.json', json.dumps({'cats': 'cat'}))
  with pytest.raises(ValueError, match=r"names\.json has no name for the "
                     r"classes \['dogs'\]"):
    util.build('image_folder', tmp_path / 'src', tmp_path / 'out',
               splits={'query': '.'}, class_names=tmp_path / 'names.json')
  with pytest.raises(FileNotFoundError, match=r"split 'support', .*train, "
                     'does not exist'):
    util.build('image_folder', tmp_path / 'src', tmp_path / 'out')
