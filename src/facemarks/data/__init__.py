"""Data sources of the download stage: synthetic faces, iBUG 300-W, local folders, photos labelled by dlib, person groups."""
