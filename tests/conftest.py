"""The baseline runs of tests/test_cp_exactness.py, shared with tests/test_fsdp.py: launched once a pytest session."""

import pytest

from test_cp_exactness import launch, run_args


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """The baseline run of a data-parallel size, with or without document masking; each launched once, when needed."""
    tmp, runs = tmp_path_factory.mktemp("baseline"), {}

    def run(data_parallel, document_masking):
        if (data_parallel, document_masking) not in runs:
            runs[data_parallel, document_masking] = launch(
                "run_origin_clm.sh", tmp / f"dp{data_parallel}-{document_masking}", nproc=data_parallel,
                extra=run_args(data_parallel, document_masking),
            )
        return runs[data_parallel, document_masking]

    return run
