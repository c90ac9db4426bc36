#!/bin/bash
# On a GPU machine without a package registry: install the wheels that ../shared/gpu-wheels.sh fetched and the
# call carried (.whl: the pinned stack; .whl-fa4a and .whl-fa4b: FlashAttention-4, which travel in two calls while
# the machine stays warm, since each call carries at most 64 MiB). Source it: it exports PYTHONPATH.
#   source bench/install_wheels.sh
mkdir -p /tmp/fa4w
for part in .whl-fa4a .whl-fa4b; do [ -d $part ] && cp $part/* /tmp/fa4w/; done
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || return 1
fi
if ls /tmp/fa4w/libs.part.aa /tmp/fa4w/libs.part.ab >/dev/null 2>&1 && [ ! -d /tmp/fa4site ]; then
  (cd /tmp/fa4w && cat libs.part.* > nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl \
    && rm libs.part.* && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fa4site *.whl) || return 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# The second path is what the cutlass package's .pth adds; a .pth is read in site-packages only.
[ -d /tmp/fa4site ] && export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
echo "PYTHONPATH=$PYTHONPATH"
