"""Model families for the tracing core: one adapter module per family.

``base`` defines the interface (:class:`~.base.ModelAdapter`, the token layout of an attention
call, the reading of a model call); ``diffusers_unet`` (with its processors in
``diffusers_processors``) is the family of diffusers UNets; ``ldm`` the family of CompVis
``ldm`` models (StableVITON, DCI-VTON); ``registry`` picks the adapter of a target. Importing
this package imports no model library.
"""
