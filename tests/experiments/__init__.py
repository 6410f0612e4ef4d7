"""Tests of the experiment configs (experiments/)."""
