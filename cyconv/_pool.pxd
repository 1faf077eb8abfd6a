from cython cimport floating
from cyconv._conv cimport Geometry
