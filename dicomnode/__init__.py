"""The uPETe DICOM node: receive → store → assemble → job → enhance → write derived → send."""
