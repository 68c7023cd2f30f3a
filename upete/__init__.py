"""The `upete` command line: the composition root that wires the DICOM node and the model together.

It lives outside ``dicomnode/`` and ``model/`` so that neither has to import the other's internals:
the node reaches the model only through ``model.enhance``, and commands such as ``simulate`` that need
both (phantoms from the model, DICOM from the node) are assembled here.
"""

__version__ = "0.1.0"
