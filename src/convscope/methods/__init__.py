"""Attribution: class activation maps, gradient saliency and their sanity checks.

Names only here (no torch import), so the CLI can list the methods without loading torch.
"""

#: CAM methods of :func:`convscope.cam`, in the order the docs list them.
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "fasterscorecam",
               "ablationcam", "eigencam", "guided_gradcam")
#: Methods of :func:`convscope.saliency`.
SALIENCY_METHODS = ("vanilla", "input_x_gradient", "smoothgrad", "integrated_gradients",
                    "guided_backprop", "occlusion")
