# A ring record's fields read at their offsets in the object, for the compiled modules
# that walk batches of records (spanfill.pxd, sampling.pxd cimport these). Declarations
# only: no module of this name runs; the Python equivalents are getattr and the field's
# name (each cimporting module's .py gives them).

cdef extern from *:
    """
    #include "structmember.h"

    /* a record's field by its offset in the object (an object slot, never unset in a
       msgspec Struct; None if it were) */
    static CYTHON_INLINE PyObject *fp_member(PyObject *obj, Py_ssize_t offset) {
        PyObject *v = *(PyObject **)((char *)obj + offset);
        if (v == NULL) v = Py_None;
        Py_INCREF(v);
        return v;
    }

    /* the offset of an object-slot field, from its member descriptor */
    static Py_ssize_t fp_member_offset(PyObject *descr) {
        PyMemberDef *m;
        if (!PyObject_TypeCheck(descr, &PyMemberDescr_Type)) {
            PyErr_SetString(PyExc_TypeError, "not a member descriptor");
            return -1;
        }
        m = ((PyMemberDescrObject *)descr)->d_member;
        if ((m->type != T_OBJECT_EX && m->type != T_OBJECT) || m->offset <= 0) {
            PyErr_SetString(PyExc_TypeError, "not an object field");
            return -1;
        }
        return m->offset;
    }
    """
    object fp_member(object obj, Py_ssize_t offset)
    Py_ssize_t fp_member_offset(object descr) except -1
