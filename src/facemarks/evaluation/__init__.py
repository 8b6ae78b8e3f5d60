"""Scoring: test-set metrics, real photos against dlib's points, detector reports, paired comparisons."""
