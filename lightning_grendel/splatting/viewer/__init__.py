"""Looking at a trained scene: camera paths, video files and the ``lightning-grendel render`` command."""
