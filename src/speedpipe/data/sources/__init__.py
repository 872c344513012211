"""Image sources of one's own, beside the built-in mnist5k and image_folder (speedpipe.data.images): one module here
each, named as `data.name` selects it, defining

    def open_dataset(data):  # data: the config's data section
        ...                  # -> a dataset: len(), [i] -> (image [3, H, W] in [-1, 1], label) or None if unreadable,
                             #    num_classes, fingerprint() (a name of its content: what the stages record)

and, for settings of its own, SETTINGS = {"key": default}: the section data.{name}, typed by the defaults
(speedpipe.declared), read by the four data stages of an experiment on that source only. The autoencoder, encode,
classifier and reference stages and the checks before a run (its image count) open it by name."""
