"""dicomnode: a DICOM node that enhances low-quality images and sends them back as Secondary Capture.

Data flow (one module per stage): receive -> spool -> assemble -> route -> enhance -> derive -> dispatch.
"""

__version__ = "0.1.0"
