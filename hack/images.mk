# Container images: the operator and the worker (docs/images.md).
#
# `make images` builds both with podman or docker (whichever works), from a base made of Debian
# packages and a wheelhouse under $(KUBETUNE_CACHE); VARIANT=cuda builds the CUDA worker. Layers
# are cached, so an unchanged tree rebuilds in seconds. The refs land in _out/images.env.

.PHONY: images

images:
	@VARIANT="$(or $(VARIANT),cpu)" bash hack/images/build.sh

# `make test` builds the images, and the image tests fail rather than skip without them.
TEST_PREREQS += images
export KUBETUNE_REQUIRE_IMAGES := 1
