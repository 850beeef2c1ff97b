/* pagewatch._native: joins the method tables of the files in this folder. */
#include "pw.h"
#define PY_ARRAY_UNIQUE_SYMBOL pagewatch_ARRAY_API
#include <numpy/arrayobject.h>

PyObject *pw_raise_errno(int err, const char *what)
{
    PyObject *args = Py_BuildValue("(iss)", err, strerror(err), what);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "pagewatch._native",
    "Thin wrappers over userfaultfd, PAGEMAP_SCAN, ptrace and signal handling.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

static int add_table(PyObject *m, PyMethodDef *table)
{
    for (PyMethodDef *d = table; d->ml_name; d++) {
        PyObject *f = PyCFunction_NewEx(d, NULL, PyModule_GetNameObject(m));
        if (!f || PyModule_AddObject(m, d->ml_name, f) < 0) {
            Py_XDECREF(f);
            return -1;
        }
    }
    return 0;
}

PyMODINIT_FUNC PyInit__native(void)
{
    import_array();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    PyMethodDef *tables[] = {pw_core_methods, pw_track_methods, pw_inject_methods,
                             pw_tracer_methods, pw_freeze_methods, pw_bench_methods, pw_copy_methods,
                             pw_aio_methods};
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++)
        if (add_table(m, tables[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    PyModule_AddIntConstant(m, "PAGEMAP_SCAN", (long)PW_PAGEMAP_SCAN);
    PyModule_AddIntConstant(m, "UFFDIO_API", (long)PW_UFFDIO_API);
    PyModule_AddIntConstant(m, "UFFDIO_REGISTER", (long)PW_UFFDIO_REGISTER);
    PyModule_AddIntConstant(m, "UFFDIO_UNREGISTER", (long)PW_UFFDIO_UNREGISTER);
    PyModule_AddIntConstant(m, "UFFDIO_WRITEPROTECT", (long)PW_UFFDIO_WRITEPROTECT);
    PyModule_AddIntConstant(m, "USERFAULTFD_IOC_NEW", (long)PW_USERFAULTFD_IOC_NEW);
    PyModule_AddIntConstant(m, "SIZEOF_PM_SCAN_ARG", (long)sizeof(struct pw_pm_scan_arg));
    PyModule_AddIntConstant(m, "SIZEOF_UFFD_MSG", (long)sizeof(struct pw_uffd_msg));
    return m;
}
