"""Rate-distortion evaluation: the paper's protocol on Kodak, against learned and classic anchors."""
